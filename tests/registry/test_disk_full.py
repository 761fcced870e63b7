"""Uploads to a registry whose data disk (queue, upload spool, OCI blobs) fills up.

Before, the upload failed with a bare HTTP 500 and a traceback in the log. Now: 507 with a
reason in each API's own form, nothing of the upload left on the disk, the repository as it
was, and the next upload that fits is published. A real tmpfs, a real server, oras and urllib3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from disks import small_tmpfs

from ._helpers import (
    FQRNS,
    RegistryEnv,
    RegistryServer,
    get,
    make_tarball,
    post,
    text,
    wait_until,
)
from .test_oci_push import _oras, _published

MiB = 1 << 20


def stored_bytes(data: Path) -> int:
    """Bytes in the data folder's files, the databases aside (their journals come and go)."""
    return sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and "sqlite" not in p.name)


def publishes_what_fits(
    env: RegistryEnv, registry: RegistryServer, client: Any, revision: int
) -> None:
    """A small tarball (user-pub's API) and a small oras push are published, in the current
    folder."""
    small = make_tarball({"ok.txt": b"fits\n"})
    token = env.tokens["writer"]
    assert text(post(registry, "/pubapi/publish?cid=grp/small", small, token)) == "OK\n"
    exists = "/pubapi/exists?cid=grp/small"
    wait_until(lambda: text(get(registry, exists)).startswith("PRESENT"), 120, registry.logs)
    Path("weights.bin").write_bytes(b"small weights\n")
    client.push(target=f"127.0.0.1:{registry.port}/grp/tiny:v1", files=["weights.bin"])
    assert _published(registry, "grp/tiny", "v1")["revision"] > revision
    assert env.read(FQRNS[0], "/grp/tiny/v1/weights.bin") == b"small weights\n"


def test_uploads_larger_than_the_data_disk_are_507_and_leave_nothing(
    registry_env: RegistryEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_tmpfs(registry_env.data, "24m") as data:
        registry = registry_env.start()
        token = registry_env.tokens["writer"]
        revision = registry_env.revision()
        held = stored_bytes(data)
        big = make_tarball({"weights.bin": os.urandom(30 * MiB)}, gz=False)

        response = post(registry, "/pubapi/publish?cid=grp/big", big, token)  # user-pub's API
        assert response.status == 507, response.data
        assert text(response).startswith("Server error: the registry's disk is full")
        response = post(registry, "/api/v1/cids/grp/big", big, token)  # the JSON API
        assert response.status == 507, response.data
        assert "disk is full" in json.loads(response.data)["error"]
        assert stored_bytes(data) == held

        monkeypatch.chdir(tmp_path)  # OCI: oras push of a blob larger than the disk
        Path("weights.bin").write_bytes(os.urandom(30 * MiB))
        client = _oras(registry, token=token)
        with pytest.raises(Exception, match="Insufficient Storage"):  # 507
            client.push(target=f"127.0.0.1:{registry.port}/grp/huge:v1", files=["weights.bin"])
        assert stored_bytes(data) <= held + 64  # the (resumable) session's name, not its bytes
        assert "Traceback" not in registry.logs()
        assert registry_env.revision() == revision

        publishes_what_fits(registry_env, registry, client, revision)  # by both APIs


def test_a_publish_that_fills_the_repository_disk_fails_alone(
    registry_env: RegistryEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the failed transaction's objects stayed until the daily cleanup's collection,
    so every later publish failed too (the disk stayed full), each with a traceback in the log
    and the reason ``[Errno 28] No space left on device``."""
    root = registry_env.root
    made = tmp_path / "made"
    shutil.copytree(root, made, symlinks=True)  # the fixture's repositories, onto a small disk
    with small_tmpfs(root, "12m"):
        for item in made.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, root / item.name)
        registry = registry_env.start()
        token = registry_env.tokens["writer"]
        revision = registry_env.revision()
        big = make_tarball({"weights.bin": os.urandom(20 * MiB)}, gz=False)
        assert post(registry, "/api/v1/cids/grp/big", big, token).status == 202

        def finished() -> dict[str, object] | None:
            job = json.loads(get(registry, "/api/v1/cids/grp/big", token).data)["job"]
            return job if job["state"] in ("failed", "published") else None

        job = wait_until(finished, 120, registry.logs)
        assert job["state"] == "failed", job
        reason = str(job["reason"])
        assert reason.startswith("the repository's disk is full: this upload (20.0 MiB)"), reason
        assert registry_env.revision() == revision
        command = [sys.executable, "-m", "cvmfs_ml", "repo", "check", str(root / FQRNS[0])]
        check = subprocess.run(command, capture_output=True, timeout=120)
        assert check.returncode == 0, check.stderr

        # A push whose blob fits the registry's disk but not the repository's: the same.
        monkeypatch.chdir(tmp_path)
        Path("weights.bin").write_bytes(os.urandom(20 * MiB))
        client = _oras(registry, token=token)
        client.push(target=f"127.0.0.1:{registry.port}/grp/huge:v1", files=["weights.bin"])

        def pushed() -> dict[str, object] | None:
            state = json.loads(get(registry, "/api/v1/oci/grp/huge/v1").data)
            return state if state["state"] in ("failed", "published") else None

        state = wait_until(pushed, 120, registry.logs)
        assert state["state"] == "failed", state
        assert str(state["reason"]).startswith("the repository's disk is full"), state
        assert registry_env.revision() == revision

        publishes_what_fits(registry_env, registry, client, revision)
        assert "Traceback" not in registry.logs()


def test_a_manifest_on_a_full_disk_leaves_no_partial_file(registry_env: RegistryEnv) -> None:
    """A manifest PUT that filled the disk answered 507 but left its partial temporary file
    (``blobs/sha256/.<digest>.<random>``), which nothing ever removed."""
    from disks import fill

    from .test_oci_hostile_push import MANIFEST, Pusher

    with small_tmpfs(registry_env.data, "8m") as data:
        registry = registry_env.start()
        pusher = Pusher(registry, registry_env.tokens["writer"], "grp/full")
        document = {**pusher.model(b"w" * 1000), "annotations": {"pad": "x" * 200_000}}
        fill(data / "filler", leave=16 * 1024)
        full = pusher.put("v1", document)
        assert full.status == 507, full.data
        assert [p.name for p in (data / "oci" / "blobs" / "sha256").glob(".*")] == []
        (data / "filler").unlink()
        assert pusher.put("v1", document, MANIFEST).status == 201
        assert "Traceback" not in registry.logs()
