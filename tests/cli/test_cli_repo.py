"""The ``cvmfs-ml repo`` command forms of docs/cli.md, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *args], capture_output=True, text=True, timeout=120
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    cli(
        "repo",
        "create",
        str(tmp_path / "srv"),
        "--fqrn",
        "cli.test",
        "--chunks",
        "0.0625/0.125/0.25",
    )
    return tmp_path / "srv" / "cli.test"


def test_create_publish_list_cat_check(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(bytes(range(256)) * 4000)
    (src / "sub" / "config.json").write_text('{"a": 1}\n')
    (src / "link").symlink_to("weights.bin")
    out = cli(
        "repo", "publish", str(repo), str(src), "--at", "/m/1", "--nested", "--tag", "v1", "--json"
    )
    summary = json.loads(out.stdout)
    # two files plus the .cvmfscatalog marker that --nested adds
    assert summary["revision"] == 1 and summary["files"] == 3 and summary["new_objects"] > 2

    listing = json.loads(cli("repo", "ls", str(repo), "/m/1", "-R", "--json").stdout)
    by_path = {e["path"]: e for e in listing}
    assert by_path["/m/1/weights.bin"]["type"] == "file"
    assert by_path["/m/1/weights.bin"]["size"] == 1_024_000
    assert by_path["/m/1/link"] == {
        **by_path["/m/1/link"],
        "type": "symlink",
        "target": "weights.bin",
    }
    assert by_path["/m/1/sub"]["type"] == "dir" and by_path["/m/1/sub"]["mode"] == "0755"

    cat = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "repo", "cat", str(repo), "/m/1/weights.bin"],
        capture_output=True,
        timeout=60,
    )
    assert cat.returncode == 0 and cat.stdout == (src / "weights.bin").read_bytes()

    tags = json.loads(cli("repo", "tags", str(repo), "--json").stdout)
    assert {t["name"] for t in tags} >= {"v1", "trunk"}
    assert "ok:" in cli("repo", "check", str(repo)).stdout

    cli("repo", "rm", str(repo), "/m/1/sub")
    diff = cli("repo", "diff", str(repo), "v1", "trunk").stdout.splitlines()
    assert "- /m/1/sub" in diff and "- /m/1/sub/config.json" in diff
    stat = json.loads(cli("repo", "stat", str(repo), "/m/1/weights.bin").stdout)
    assert len(stat["pieces"]) > 1 and stat["chunked"]

    cli("repo", "rollback", str(repo), "v1")
    assert json.loads(cli("repo", "ls", str(repo), "/m/1/sub", "--json").stdout)
    cli("repo", "tag", str(repo), "again", "-m", "named by the test")
    cli("repo", "resign", str(repo), "--days", "7")
    assert "removed" in cli("repo", "gc", str(repo)).stdout
    assert "ok:" in cli("repo", "check", str(repo)).stdout


def test_errors_are_one_line_on_stderr_with_nonzero_exit(repo: Path, tmp_path: Path) -> None:
    missing = cli("repo", "cat", str(repo), "/nope", ok=False)
    assert missing.returncode != 0
    assert missing.stderr.startswith("cvmfs-ml: ") and len(missing.stderr.strip().splitlines()) == 1
    assert "/nope" in missing.stderr
    wrong = cli("repo", "publish", str(tmp_path / "no-repo"), str(tmp_path), ok=False)
    assert wrong.returncode != 0 and wrong.stderr.startswith("cvmfs-ml: ")
    dup = cli("repo", "create", str(repo.parent), "--fqrn", "cli.test", ok=False)
    assert dup.returncode != 0 and "already" in dup.stderr


def test_check_exits_1_on_a_defect(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "f.txt").write_text("content\n")
    cli("repo", "publish", str(repo), str(src))
    stat = json.loads(cli("repo", "stat", str(repo), "/f.txt").stdout)
    digest = stat["hash"]
    (repo / "data" / digest[:2] / digest[2:]).unlink()
    result = cli("repo", "check", str(repo), ok=False)
    assert result.returncode == 1
    assert "FAILED" in result.stdout and f"data/{digest[:2]}/{digest[2:]}" in result.stderr


URL = "http://127.0.0.1:9/cvmfs/cli.test"


@pytest.mark.parametrize(
    "args",
    [
        ["repo", "create", URL, "--fqrn", "cli.test"],
        ["repo", "publish", URL, "."],
        ["repo", "rm", URL, "/a"],
        ["repo", "tag", URL, "t1"],
        ["repo", "gc", URL],
        ["repo", "rollback", URL, "t1"],
        ["repo", "resign", URL],
        ["sync", "wishlist.yaml", "--repo", URL],
        ["registry", "serve", "--repo", URL],
        ["model", "publish", ".", "--repo", URL, "--as", "ns/name:1"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_writing_commands_say_a_url_cannot_be_written(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writing command given the repository's URL said 'no such file or directory:
    http:/host/cvmfs/x/.cvmfspublished' (the URL taken as a folder); only the model commands
    said what to do. All of them do now. ``repo create URL`` even succeeded: it made keys and a
    repository under a local folder named ``http:``."""
    from typer.testing import CliRunner

    from cvmfs_ml.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wishlist.yaml").write_text(
        f"version: 1\nmodels:\n  - source: {tmp_path}\n    name: ns/name\n    version: '1'\n"
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    verb = "creating" if args[1] == "create" else "writing"
    assert lines[0].startswith(f"cvmfs-ml: {URL} is a URL; {verb} needs the repository folder")
    assert "Traceback" not in result.output
    assert not (tmp_path / "http:").exists()


@pytest.mark.parametrize("name", ["trunk-previous", "trunk", "two\nlines", "bad tag!", ""])
def test_tag_names_upstream_refuses_are_refused(repo: Path, tmp_path: Path, name: str) -> None:
    """``repo publish --tag trunk-previous`` published and pointed trunk-previous at the new
    revision (the undo target lost); names with spaces or a newline were stored and broke the
    one-line-per-tag listing. As upstream's publisher: letters, digits and ``-_./:`` only, and
    neither ``trunk`` nor ``trunk-previous``; refused before anything is published."""
    src = tmp_path / "m"
    src.mkdir()
    (src / "f.txt").write_text("content\n")
    refused = cli("repo", "publish", str(repo), str(src), "--tag", name, ok=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused
    assert "tag name" in refused.stderr, refused.stderr
    assert cli("repo", "tag", str(repo), name, ok=False).returncode == 1
    assert "r0" in cli("repo", "tags", str(repo)).stdout.split("trunk ")[1]  # nothing published
    cli("repo", "publish", str(repo), str(src), "--tag", "v1.0_rc-2/x:y")  # upstream's set


def test_trunk_previous_is_described_as_upstream_describes_it(repo: Path, tmp_path: Path) -> None:
    """``repo tags`` listed trunk-previous as "current HEAD" (trunk's description, copied when
    trunk moved on); upstream's publisher writes "default undo target" (as the reference
    repository's history shows)."""
    src = tmp_path / "m"
    src.mkdir()
    (src / "f.txt").write_text("content\n")
    cli("repo", "publish", str(repo), str(src))
    tags = {t["name"]: t for t in json.loads(cli("repo", "tags", str(repo), "--json").stdout)}
    assert tags["trunk"]["description"] == "current HEAD"
    assert tags["trunk-previous"]["description"] == "default undo target"
    assert tags["trunk-previous"]["revision"] == 0


def test_serve_given_the_repository_folder_says_to_serve_its_parent(repo: Path) -> None:
    """``serve /srv/cvmfs/models.example.org`` (the folder ``repo ls`` takes, not ROOT) said
    "serving ... at http://.../cvmfs/<fqrn>" and then answered 404 to every client."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml.cli", "serve", str(repo), "--port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"serve started on a repository folder: {exc.stderr!r}") from exc
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a repository folder" in lines[0], result.stderr
    assert f"serve its parent ({repo.parent})" in lines[0], lines[0]
