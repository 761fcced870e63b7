"""The registry's data folder: its databases found damaged, and a second registry on it.

A second ``registry serve`` on the same ``--data`` (another port, a restart that overlaps the
old process) took the first one's jobs being published for interrupted and queued them again,
and deleted the bodies it was receiving as orphans. It is refused now, in one line.

The queue (``<data>/queue.sqlite``) and the OCI store's index (``<data>/oci/oci.sqlite``) hold
state that nothing else has (jobs waiting, pushed tags), so unlike a cache they are not
started again silently: the registry refuses to start, in one line naming the file, what is
lost by moving it aside, and leaves it as it is. Before, the line was "database error: file is
not a database", which named neither.

Its working folders (the spool of user-pub bodies, the OCI uploads and blobs) are made again
when something removed them under a running registry (a tmp cleaner, an operator tidying up):
before, every upload then failed with a 500 until the service was restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.errors import LockedError
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.registry.config import ConfigFile
from cvmfs_ml.registry.service import RegistryService

from ._helpers import FQRNS, HTTP, RegistryEnv, get, job_json, make_tarball, post, text, wait_until


@pytest.mark.parametrize(("rel", "lost"), [("queue.sqlite", "jobs"), ("oci/oci.sqlite", "tags")])
def test_registry_refuses_a_damaged_database_naming_it(tmp_path: Path, rel: str, lost: str) -> None:
    repo = create_repository(tmp_path / "srv", "damaged.test").repo_dir
    damaged = tmp_path / "data" / rel
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a database, whatever it was" * 64)
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "registry", "serve", "--repo", str(repo),
         "--data", str(tmp_path / "data"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cvmfs-ml: ")]
    assert len(lines) == 1 and str(damaged) in lines[0], result.stderr
    assert "damaged" in lines[0] and "move it aside" in lines[0] and lost in lines[0]
    assert "Traceback" not in result.stderr
    assert damaged.read_bytes() == b"not a database, whatever it was" * 64  # left as it was


def test_a_second_registry_on_the_same_data_folder_is_refused(registry_env: RegistryEnv) -> None:
    first = registry_env.start()
    entries_before = sorted(p.name for p in registry_env.data.iterdir())
    second = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "registry", "serve",
         *(a for repo in registry_env.repos for a in ("--repo", str(repo))),
         "--config", str(registry_env.config), "--data", str(registry_env.data), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 1, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.startswith("cvmfs-ml: ")]
    assert len(lines) == 1 and "another registry (pid " in lines[0], second.stderr
    assert str(registry_env.data) in lines[0] and "--data" in lines[0]
    assert "Traceback" not in second.stderr
    assert text(get(first, "/pubapi/ping")) == "OK\n"  # the first one is untouched
    assert sorted(p.name for p in registry_env.data.iterdir()) == entries_before


def test_the_data_folder_is_free_again_once_a_service_stops(registry_env: RegistryEnv) -> None:
    def service() -> RegistryService:
        return RegistryService(registry_env.repos, registry_env.data,
                               ConfigFile(registry_env.config))  # fmt: skip

    first = service()
    with pytest.raises(LockedError, match=rf"pid {os.getpid()}\) serves"):
        service()
    first.stop()
    service().stop()


def test_working_folders_removed_under_a_running_registry_are_made_again(
    registry_env: RegistryEnv,
) -> None:
    server = registry_env.start()
    token = registry_env.tokens["writer"]
    auth = {"Authorization": f"Bearer {token}"}
    for folder in ("spool", "oci/uploads", "oci/blobs"):
        shutil.rmtree(registry_env.data / folder)

    body = make_tarball({"w.bin": b"weights" * 100})
    answer = post(server, "/pubapi/publish?cid=grp/again", body, token)
    assert answer.status == 200 and text(answer) == "OK\n", text(answer)
    done = wait_until(
        lambda: text(get(server, "/pubapi/exists?cid=grp/again", token)).startswith("PRESENT:"),
        120, server.logs,
    )  # fmt: skip
    assert done and registry_env.read(FQRNS[0], "/sw/grp/again/w.bin") == b"weights" * 100

    # The OCI API: a resumable session and a blob, into folders made again.
    blob = os.urandom(3000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    pushed = HTTP.request("POST", f"{server.url}/v2/grp/m/blobs/uploads/?digest={digest}",
                          body=blob, headers=auth)  # fmt: skip
    assert pushed.status == 201, pushed.data
    assert HTTP.request("GET", f"{server.url}/v2/grp/m/blobs/{digest}").data == blob
    created = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/later", headers=auth)
    assert created.status == 201, created.data
    shutil.rmtree(registry_env.data / "spool")  # gone again before the session is queued
    location = server.url + json.loads(created.data)["location"]
    later = make_tarball({"x": b"x"})
    HTTP.request("PATCH", location, body=later,
                 headers={**auth, "Content-Range": f"0-{len(later) - 1}"})  # fmt: skip
    queued = HTTP.request("PUT", location, headers=auth)
    assert queued.status == 202, queued.data
    job = json.loads(queued.data)["id"]
    assert wait_until(lambda: job_json(server, job)["state"] == "published", 120, server.logs)
    assert "Traceback" not in server.logs()
