"""The sync loop: webhook-triggered rounds, webhook payloads, loop rounds and metrics, failures.

Real parts on loopback: Debian's docker-registry with its notifications pointed at our webhook
(for the push test), ``oras`` pushes and ``skopeo`` pushes. The loop re-reads its wishlist each
round, outlives a round that fails unexpectedly, and a round that fills the disk cleans up after
itself. Model sync from registries and MLflow is in ``test_sync_models.py``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.models.sources.oci_client import OCI_MANIFEST
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.sync.engine import run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.loop import SyncLoop
from cvmfs_ml.sync.webhook import WebhookServer, parse_notification
from cvmfs_ml.testing import NotifyingDockerRegistry
from sync.imagebuild import FQRN, published, sha256
from sync.model_helpers import HTTP, model_files, oras_push, push_small_image, write_wishlist
from waiting import wait_until


# -- webhook: the registry's own notifications wake the loop ---------------------------------------
@pytest.mark.service
def test_webhook_push_triggers_a_round(publisher: Publisher, tmp_path: Path) -> None:
    token = "hook-secret"
    wishlist = tmp_path / "wishlist.yaml"
    loop = SyncLoop(publisher, wishlist, interval=3600.0)
    server = WebhookServer(loop.notify, token=token).start()
    registry = NotifyingDockerRegistry(server.url, token, workdir=tmp_path / "registry")
    thread = None
    try:
        host = registry.host
        oras_push(host, "ml/hooked:v1", {"w.bin": b"one"}, tmp_path / "p1")
        push_small_image(host, tmp_path, "lib/hooked", "1")
        push_small_image(host, tmp_path, "lib/hooked", "2")
        entry = f"models:\n  - source: http://{host}/ml/hooked:v*\n    name: hep/hooked\n"
        write_wishlist(wishlist, host, images=["lib/hooked:*"], models=entry)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        wait_until(lambda: len(loop.reports) >= 1, 60, "the first full round")
        first = publisher.manifest().revision
        assert model_files(publisher, "/hep/hooked/v1") == {"w.bin": sha256(b"one")}
        with published(publisher) as repo:
            assert repo.exists(f"/{host}/lib/hooked:2")

        # A push; the interval is an hour, so only the notification can start the round.
        oras_push(host, "ml/hooked:v2", {"w.bin": b"two"}, tmp_path / "p2")
        wait_until(lambda: publisher.manifest().revision > first, 60, "the webhook-triggered round")
        assert model_files(publisher, "/hep/hooked/v2") == {"w.bin": sha256(b"two")}
        assert any(e.action == "webhook" for e in loop.log.events)

        # A delete in the registry: a full round at once schedules the tag's removal.
        digest = HTTP.request(
            "HEAD",
            f"http://{host}/v2/lib/hooked/manifests/2",
            headers={"Accept": OCI_MANIFEST},
        ).headers["Docker-Content-Digest"]
        deleted = HTTP.request("DELETE", f"http://{host}/v2/lib/hooked/manifests/{digest}")
        assert deleted.status == 202
        wait_until(  # the event is logged during the round, its report added at its end
            lambda: any(e.action == "schedule_removal" for e in loop.log.events)
            and len(loop.reports) >= 3,
            60,
            lambda: f"the full round after the delete ({len(loop.reports)} rounds done)",
        )
    finally:
        loop.stop()
        if thread is not None:
            thread.join(timeout=60)
        server.stop()
        registry.close()


def test_webhook_payloads_and_token() -> None:
    harbor = {
        "type": "PUSH_ARTIFACT",
        "event_data": {
            "resources": [
                {
                    "tag": "v3",
                    "digest": "sha256:" + "b" * 64,
                    "resource_url": "harbor.example/lib/app:v3",
                }
            ],
            "repository": {"name": "app", "namespace": "lib", "repo_full_name": "lib/app"},
        },
    }
    [event] = parse_notification(json.dumps(harbor).encode())
    assert (event.action, event.repository, event.tag, event.registry) == (
        "push",
        "lib/app",
        "v3",
        "harbor.example",
    )
    blob = {
        "mediaType": "application/octet-stream",
        "repository": "a/b",
        "digest": "sha256:" + "c" * 64,
    }
    blob_only = {"events": [{"action": "push", "target": blob}]}
    assert parse_notification(json.dumps(blob_only).encode()) == []

    received: list[Any] = []
    server = WebhookServer(received.extend, token="t").start()
    try:
        body = json.dumps(harbor).encode()
        denied = HTTP.request("POST", server.url, body=body, headers={"Authorization": "Bearer x"})
        assert denied.status == 401 and not received
        bad = HTTP.request("POST", server.url, body=b"{", headers={"Authorization": "Bearer t"})
        assert bad.status == 400
        ok = HTTP.request("POST", server.url, body=body, headers={"Authorization": "Bearer t"})
        assert ok.status == 202 and received == [event]
    finally:
        server.stop()


def test_webhook_drops_a_sender_that_stalls() -> None:
    """A sender that declares a body and stops sending loses its connection after the read
    timeout (it held a thread forever before); senders after it are served meanwhile."""
    import socket
    import time

    received: list[Any] = []
    server = WebhookServer(received.extend, read_timeout=0.5).start()
    try:
        host, port = server.server_address[:2]
        stalled = socket.create_connection((host, port), timeout=30)
        stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        ok = HTTP.request("POST", server.url, body=b'{"events": []}')
        assert ok.status == 202
        deadline = time.monotonic() + 30
        closed = False
        while not closed and time.monotonic() < deadline:
            closed = stalled.recv(4096) == b""  # the server hangs up, answering nothing
        assert closed
        stalled.close()
    finally:
        server.stop()


def _local_folder_wishlist(tmp_path: Path) -> Path:
    """A wishlist of one folder source (``hep/local:1``, a 1000-byte weights file)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    wishlist = tmp_path / "wishlist.yaml"
    wishlist.write_text(
        f"version: 1\nmodels:\n  - source: {folder}\n    name: hep/local\n    version: '1'\n"
    )
    return wishlist


def test_loop_rounds_and_metrics(publisher: Publisher, tmp_path: Path) -> None:
    """``--loop`` re-reads the wishlist each round; a folder source needs no registry."""
    from prometheus_client import CollectorRegistry

    wishlist = _local_folder_wishlist(tmp_path)
    good = wishlist.read_text()
    result = CliRunner().invoke(
        app,
        [
            "sync",
            str(wishlist),
            "--repo",
            str(publisher.repo_dir),
            "--loop",
            "--rounds",
            "2",
            "--interval",
            "0.1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["committed"] for r in reports] == [True, False]
    assert model_files(publisher, "/hep/local/1") == {"weights.bin": sha256(b"w" * 1000)}

    metrics = CollectorRegistry()
    loop = SyncLoop(publisher, wishlist, interval=0.05, metrics_registry=metrics)
    wishlist.write_text("version: 1\ninput: [: :\n")  # broken by an edit: an error, not a crash
    loop.run(rounds=2)
    assert [e.status for e in loop.log.events if e.action == "sync_round"] == ["error", "error"]
    wishlist.write_text(good)
    loop.run(rounds=1)
    assert metrics.get_sample_value("cvmfs_ml_sync_rounds_total") == 1
    assert metrics.get_sample_value("cvmfs_ml_sync_last_revision") == reports[0]["revision_after"]


def test_the_loop_outlives_a_round_that_fails_unexpectedly(
    publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception outside the error tree (a bug, or an input no check knows yet) is an error
    event of that round, and the next round runs: ``--loop`` once died with a traceback.
    The fault is injected (mocked), since every real one found so far is now a FormatError."""
    import cvmfs_ml.sync.loop as loop_module

    wishlist = _local_folder_wishlist(tmp_path)
    calls = []

    def first_round_breaks(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("'NoneType' object is not subscriptable")
        return run_round(*args, **kwargs)

    monkeypatch.setattr(loop_module, "run_round", first_round_breaks)
    log = EventLog()
    loop = SyncLoop(publisher, wishlist, interval=0.05, log=log)
    assert loop.run_once() is None
    report = loop.run_once()
    assert report is not None and report.committed
    errors = [e for e in log.events if e.status == "error"]
    assert len(errors) == 1 and errors[0].action == "sync_round"
    assert errors[0].error.startswith("internal error (please report): TypeError")
    assert model_files(publisher, "/hep/local/1") == {"weights.bin": sha256(b"w" * 1000)}


def test_a_round_that_fills_the_disk_cleans_up_after_itself(tmp_path: Path) -> None:
    """Before, the round failed with ``[Errno 28] No space left on device`` and left its
    objects on the disk until some later collection, so the next rounds failed as well."""
    from disks import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "12m") as disk:
        publisher = create_repository(disk / "srv", FQRN)
        wishlist = _local_folder_wishlist(tmp_path)
        (tmp_path / "model" / "weights.bin").write_bytes(os.urandom(20 * 2**20))
        args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1
        assert "the repository's disk is full, nothing was published" in result.output
        assert "unreferenced objects collected" in result.output
        assert publisher.manifest().revision == 0
        fs = os.statvfs(disk)
        assert fs.f_bavail * fs.f_frsize > 8 * 2**20  # what the round wrote is gone

        (tmp_path / "model" / "weights.bin").write_bytes(b"w" * 1000)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert model_files(publisher, "/hep/local/1") == {"weights.bin": sha256(b"w" * 1000)}


def test_loop_rounds_exit_status_says_the_last_round_failed(
    publisher: Publisher, tmp_path: Path
) -> None:
    """``--loop --rounds N`` exited 0 when every round failed, so scripts and CI took a sync
    that published nothing for a success. Its exit status is now the last round's, as for a
    one-shot sync: 1 with one line saying so."""
    wishlist = _local_folder_wishlist(tmp_path)
    (tmp_path / "model" / "weights.bin").unlink()
    (tmp_path / "model").rmdir()  # the source is gone: every round fails on it
    args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir), "--loop"]
    result = CliRunner().invoke(app, [*args, "--rounds", "2", "--interval", "0.05", "--json"])
    assert result.exit_code == 1, result.output
    assert [json.loads(line)["errors"] for line in result.stdout.splitlines()] == [1, 1]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cvmfs-ml: sync: the last of 2 round(s) failed"), result.stderr
    assert "Traceback" not in result.output
    assert publisher.manifest().revision == 0
