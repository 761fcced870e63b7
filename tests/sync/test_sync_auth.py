"""The registry auth file of a sync service that runs for months: what changes under it.

Real parts on loopback: Debian's docker-registry behind a Bearer-token front (user ``alice``,
password ``secret``), ``oras`` pushes, and the auth file written as ``docker login`` writes it.
Rotated and broken files are in ``test_sync_models.py``.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.auth import AuthFile
from cvmfs_ml.sync.engine import SyncOptions
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.loop import SyncLoop
from models.oci_helpers import TokenFront
from sync.imagebuild import sha256
from sync.model_helpers import model_files, oras_push

pytestmark = pytest.mark.service


@pytest.fixture
def front(docker_registry: Any) -> Iterator[TokenFront]:
    server = TokenFront(docker_registry.url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _login(path: Path, host: str) -> None:
    """What ``docker login HOST`` leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(b"alice:secret").decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))


def _round(loop: SyncLoop, log: EventLog) -> tuple[Any, list[str]]:
    """One round: its report and its error events (``action: error``; not ``end_sync``'s)."""
    before = len(log.events)
    report = loop.run_once()
    assert report is not None
    errors = [f"{e.action}: {e.error}" for e in list(log.events)[before:] if e.status == "error"
              and e.action != "end_sync"]  # fmt: skip
    return report, errors


def _loop(publisher: Publisher, tmp_path: Path, host: str, auth: AuthFile) -> SyncLoop:
    wishlist = tmp_path / "wishlist.yaml"
    wishlist.write_text(
        f"version: 1\nmodels:\n  - source: http://{host}/ml/private:v*\n    name: hep/private\n"
    )
    return SyncLoop(publisher, wishlist, options=SyncOptions(auth=auth), log=EventLog())


def test_a_later_docker_login_and_a_removed_auth_file_take_effect_next_round(
    docker_registry: Any,
    front: TokenFront,
    publisher: Publisher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A service started before anyone ran ``docker login`` never looked for the file again:
    the auth file was read each round only if one existed at start, so every round was a 401
    until a restart. The lookup (``$REGISTRY_AUTH_FILE``, ``$DOCKER_CONFIG/config.json``,
    ``~/.docker/config.json``) now runs each round: a file that appears is used at the next
    round, and one removed takes its credentials with it (no error: anonymous is a state)."""
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "docker" / "config.json"
    oras_push(docker_registry.host, "ml/private:v1", {"w.bin": b"one"}, tmp_path / "p1")
    loop = _loop(publisher, tmp_path, front.host, AuthFile.load())  # as `sync` without a file

    report, errors = _round(loop, loop.log)
    assert report.errors == 1 and not report.committed
    assert "401" in errors[0]

    _login(config, front.host)  # `docker login` while the service runs
    report, errors = _round(loop, loop.log)
    assert report.errors == 0 and report.committed, errors
    assert model_files(publisher, "/hep/private/v1") == {"w.bin": sha256(b"one")}
    used = [e for e in loop.log.events if e.action == "read_auth"]
    assert [e.extra.get("auth_file") for e in used] == [str(config)]

    config.unlink()  # credentials taken away
    oras_push(docker_registry.host, "ml/private:v2", {"w.bin": b"two"}, tmp_path / "p2")
    report, errors = _round(loop, loop.log)
    assert report.errors == 1 and not report.committed
    assert len(errors) == 1 and errors[0].startswith("sync_model") and "401" in errors[0]


def test_a_named_auth_file_removed_takes_its_credentials_with_it(
    docker_registry: Any, front: TokenFront, publisher: Publisher, tmp_path: Path
) -> None:
    """``--auth-file`` removed while the loop runs: its credentials went on being used, with a
    ``read_auth`` error each round saying so. Gone now means no credentials from it, and the
    file is used again once it is back."""
    named = tmp_path / "auth.json"
    _login(named, front.host)
    oras_push(docker_registry.host, "ml/private:v1", {"w.bin": b"one"}, tmp_path / "p1")
    loop = _loop(publisher, tmp_path, front.host, AuthFile.load(named))
    report, errors = _round(loop, loop.log)
    assert report.committed and not errors

    named.unlink()
    oras_push(docker_registry.host, "ml/private:v2", {"w.bin": b"two"}, tmp_path / "p2")
    report, errors = _round(loop, loop.log)
    assert not report.committed
    assert len(errors) == 1 and errors[0].startswith("sync_model") and "401" in errors[0]

    _login(named, front.host)
    report, errors = _round(loop, loop.log)
    assert report.committed and not errors
    assert model_files(publisher, "/hep/private/v2") == {"w.bin": sha256(b"two")}
