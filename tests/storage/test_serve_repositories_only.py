"""Issue 9, item 4: ``serve`` serves repositories only, never keys; a busy port is one line."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.storage.http import RepositoryServer, private_keys_under

FQRN = "keys.test"


def status(server: RepositoryServer, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_no_keys_served(server: RepositoryServer, paths: list[str]) -> None:
    for path in paths:
        code, body = status(server, path)
        assert code == 404, path
        assert b"PRIVATE KEY" not in body


def test_keys_folder_inside_the_served_root(tmp_path: Path) -> None:
    root = tmp_path / "R"
    create_repository(root, FQRN, keys_dir=root / "keys")  # repo create R --keys R/keys
    assert (root / "keys" / f"{FQRN}.masterkey").is_file()
    with RepositoryServer(root) as server:
        assert status(server, f"/cvmfs/{FQRN}/.cvmfspublished")[0] == 200
        assert_no_keys_served(
            server,
            [
                f"/cvmfs/keys/{FQRN}.masterkey",
                f"/cvmfs/keys/{FQRN}.key",
                f"/cvmfs/keys/{FQRN}.crt",
                f"/cvmfs/keys/{FQRN}.pub",  # not secret, but not a repository either
            ],
        )
    assert sorted(p.name for p in private_keys_under(root)) == [f"{FQRN}.key", f"{FQRN}.masterkey"]


def test_serving_the_parent_of_the_default_layout(tmp_path: Path) -> None:
    create_repository(tmp_path / "top" / "srv", FQRN)  # keys land in top/keys
    with RepositoryServer(tmp_path / "top") as server:
        assert_no_keys_served(
            server,
            [
                f"/cvmfs/keys/{FQRN}.masterkey",
                f"/cvmfs/srv/{FQRN}/.cvmfspublished",  # srv is a folder of repositories
            ],
        )
    with RepositoryServer(tmp_path / "top" / "srv") as server:
        assert status(server, f"/cvmfs/{FQRN}/.cvmfswhitelist")[0] == 200


def test_keys_inside_a_repository_folder_and_links_to_them(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    publisher = create_repository(root, FQRN, keys_dir=root / FQRN / "keys")
    repo = publisher.repo_dir
    (repo / "data" / "aa").mkdir(exist_ok=True)
    (repo / "data" / "aa" / "linked").symlink_to(repo / "keys" / f"{FQRN}.masterkey")
    (repo / "data" / "txn" / "staged").write_bytes(b"half-written")
    (repo / "elsewhere").symlink_to(tmp_path)
    (tmp_path / "outside.txt").write_bytes(b"-----BEGIN PRIVATE KEY----- (not in a repository)")
    with RepositoryServer(root) as server:
        assert_no_keys_served(
            server,
            [
                f"/cvmfs/{FQRN}/keys/{FQRN}.masterkey",
                f"/cvmfs/{FQRN}/keys/{FQRN}.key",
                f"/cvmfs/{FQRN}/data/aa/linked",
                f"/cvmfs/{FQRN}/data/txn/staged",
                f"/cvmfs/{FQRN}/elsewhere/outside.txt",
            ],
        )
        assert status(server, f"/cvmfs/{FQRN}/.cvmfspublished")[0] == 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_cli_serve_warns_about_keys_under_its_root(tmp_path: Path) -> None:
    root = tmp_path / "R"
    create_repository(root, FQRN, keys_dir=root / "keys")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_ml", "serve", str(root), "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert process.stderr is not None
        lines: list[bytes] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(b"serving" in line for line in lines):
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
        text = b"".join(lines).decode()
        assert "warning" in text and f"{FQRN}.key" in text, text
        assert "serving" in text, text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_cli_serve_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    create_repository(tmp_path / "srv", FQRN)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml", "serve", str(tmp_path / "srv"), "--port", str(port)],
            capture_output=True,
            timeout=60,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0], stderr


@pytest.mark.parametrize("name", ["x.key", "x.masterkey", "x.crt", "x.pem"])
def test_key_names_are_never_served_even_inside_a_repository(tmp_path: Path, name: str) -> None:
    publisher = create_repository(tmp_path / "srv", FQRN)
    (publisher.repo_dir / name).write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    with RepositoryServer(tmp_path / "srv") as server:
        assert_no_keys_served(server, [f"/cvmfs/{FQRN}/{name}"])


def test_plain_folders_only_when_named_and_never_their_keys(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    (root / "plain" / "m").mkdir(parents=True)
    (root / "plain" / "m" / "model.onnx").write_bytes(b"weights")
    (root / "plain" / "m" / "site.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (root / "other").mkdir()
    (root / "other" / "x.bin").write_bytes(b"x")
    with RepositoryServer(root) as server:  # by default: repositories only
        assert status(server, "/cvmfs/plain/m/model.onnx")[0] == 404
    with RepositoryServer(root, plain_folders=("plain",)) as server:
        assert status(server, "/cvmfs/plain/m/model.onnx") == (200, b"weights")
        assert status(server, "/cvmfs/other/x.bin")[0] == 404  # only the folders named
        assert_no_keys_served(server, ["/cvmfs/plain/m/site.key", "/cvmfs/plain/../other/x.bin"])
