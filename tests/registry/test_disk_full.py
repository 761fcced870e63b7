"""Uploads to a registry whose data disk (queue, upload spool, OCI blobs) fills up.

Before, the upload failed with a bare HTTP 500 and a traceback in the log. Now: 507 with a
reason in each API's own form, nothing of the upload left on the disk, the repository as it
was, and the next upload that fits is published. A real tmpfs, a real server, oras and urllib3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from disks import small_tmpfs

from ._helpers import FQRNS, RegistryEnv, get, make_tarball, post, text, wait_until
from .test_oci_push import _oras, _published

MiB = 1 << 20


def stored_bytes(data: Path) -> int:
    """Bytes in the data folder's files, the databases aside (their journals come and go)."""
    return sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and "sqlite" not in p.name)


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

        # Uploads that fit go through.
        small = make_tarball({"ok.txt": b"fits\n"})
        assert text(post(registry, "/pubapi/publish?cid=grp/small", small, token)) == "OK\n"
        exists = "/pubapi/exists?cid=grp/small"
        wait_until(lambda: text(get(registry, exists)).startswith("PRESENT"), 120, registry.logs)
        Path("weights.bin").write_bytes(b"small weights\n")
        client.push(target=f"127.0.0.1:{registry.port}/grp/tiny:v1", files=["weights.bin"])
        assert _published(registry, "grp/tiny", "v1")["revision"] > revision
        assert registry_env.read(FQRNS[0], "/grp/tiny/v1/weights.bin") == b"small weights\n"
