"""Sync of model artifacts (ORAS, ModelPack) and images through the CLI, the webhook, MLflow.

Real parts on loopback: Debian's docker-registry (with its notifications pointed at our webhook
for the push test), ``oras`` pushes, ``skopeo`` pushes, and an ``mlflow server`` with a SQLite
backend.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import ANNOTATION_TITLE
from cvmfs_ml.models.sources.oci_client import OCI_MANIFEST
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.sync.auth import AuthFile
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.loop import SyncLoop
from cvmfs_ml.sync.webhook import WebhookServer, parse_notification
from cvmfs_ml.sync.wishlist import parse_wishlist
from cvmfs_ml.testing import NotifyingDockerRegistry, free_port
from models.test_oci import TokenFront, push_blob, push_manifest, push_modelpack
from sync.imagebuild import FQRN, make_layer, published, push_layout, sha256, write_oci_layout
from waiting import wait_until

HTTP = urllib3.PoolManager()


def oras_push(host: str, target: str, files: dict[str, bytes], work: Path) -> None:
    """Push ``files`` as an ORAS artifact with the oras package, as users do."""
    import oras.client

    work.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    previous = os.getcwd()
    os.chdir(work)  # oras-py wants paths below the working directory
    try:
        oras.client.OrasClient(insecure=True).push(target=f"{host}/{target}", files=list(files))
    finally:
        os.chdir(previous)


def model_files(publisher: Publisher, path: str) -> dict[str, str]:
    with published(publisher) as repo:
        return {
            e.path[len(path) + 1 :]: sha256(repo.read_bytes(e.path))
            for e in repo.walk(path)
            if e.is_regular and e.name not in ("model.json", ".cvmfscatalog")
        }


def alias_of(publisher: Publisher, model: str, alias: str) -> str:
    with published(publisher) as repo:
        return repo.readlink(f"/{model}/{alias}")


def push_small_image(host: str, tmp_path: Path, repository: str, tag: str) -> None:
    layout = tmp_path / f"layout-{tag}"
    layer = make_layer([("etc", None), ("etc/os", b"test\n"), ("etc/tag", tag.encode())])
    write_oci_layout(layout, [(layer, "gzip")], tag)
    push_layout(layout, tag, host, repository)


def write_wishlist(path: Path, host: str, *, images: list[str], models: str) -> Path:
    inputs = "".join(f"  - 'http://{host}/{image}'\n" for image in images)
    path.write_text(f"version: 1\nuser: cvmfs\ncvmfs_repo: {FQRN}\ninput:\n{inputs}{models}")
    return path


@pytest.mark.service
def test_cli_sync_publishes_image_and_models(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    host = docker_registry.host
    push_small_image(host, tmp_path, "lib/base", "1")
    weights = random.Random(3).randbytes(400_000)
    oras_files = {"model.onnx": weights, "labels.txt": b"cat\ndog\n"}
    oras_push(host, "ml/net:v1", oras_files, tmp_path / "push-v1")
    _, modelpack = push_modelpack(docker_registry.url, "ml/pack", "1.0")
    wishlist = write_wishlist(
        tmp_path / "wishlist.yaml",
        host,
        images=["lib/base:1"],
        models=(
            f"models:\n  - source: http://{host}/ml/net:v*\n    name: hep/net\n"
            f"    aliases: [prod]\n"
            f"  - source: http://{host}/ml/pack:1.0\n    name: hep/pack\n"
        ),
    )
    events = tmp_path / "events.jsonl"
    runner = CliRunner()
    args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir), "-n", str(events)]
    before = publisher.manifest().revision
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert publisher.manifest().revision == before + 1  # images and models: one revision
    assert f"revision {before} -> {before + 1}" in result.output

    assert model_files(publisher, "/hep/net/v1") == {k: sha256(v) for k, v in oras_files.items()}
    assert model_files(publisher, "/hep/pack/1.0") == {k: sha256(v) for k, v in modelpack.items()}
    assert alias_of(publisher, "hep/net", "latest") == "v1"
    with published(publisher) as repo:
        link = repo.readlink(f"/{host}/lib/base:1")
        assert link.startswith("../../.flat/")
        assert repo.read_bytes(f"/{host}/lib/{link}/etc/os") == b"test\n"
    checked = runner.invoke(app, ["repo", "check", str(publisher.repo_dir)])
    assert checked.exit_code == 0, checked.output  # signatures, objects, nested catalogs
    info = runner.invoke(app, ["model", "info", str(publisher.repo_dir), "hep/net:v1", "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["source"]["kind"] == "artifact" and described["file_count"] == 2
    # model.json's digests (taken from the verified blobs, not read again) are the files'.
    with published(publisher) as repo:
        record = read_record(repo, ModelRef("hep", "net", "v1"))
    assert {f.path: f.sha256 for f in record.files} == {
        k: sha256(v) for k, v in oras_files.items()
    }
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    assert {"publish_flat_image", "publish_model", "publish"} <= {e["action"] for e in logged}
    assert all(e["status"] == "ok" for e in logged)

    # Nothing changed: no revision.
    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.splitlines()[-1])["committed"] is False
    assert publisher.manifest().revision == before + 1

    # A new tag (and `prod` pointed at it): exactly one revision; latest and prod follow.
    oras_push(host, "ml/net:v2", {"model.onnx": weights[::-1]}, tmp_path / "push-v2")
    oras_push(host, "ml/net:prod", {"model.onnx": weights[::-1]}, tmp_path / "push-v2")
    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    assert publisher.manifest().revision == before + 2
    assert alias_of(publisher, "hep/net", "latest") == "v2"
    assert alias_of(publisher, "hep/net", "prod") == "v2"
    assert model_files(publisher, "/hep/net/v2") == {"model.onnx": sha256(weights[::-1])}


@pytest.mark.service
def test_cli_errors_are_one_line(publisher: Publisher, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ninput: [: :\n")
    result = CliRunner().invoke(app, ["sync", str(broken), "--repo", str(publisher.repo_dir)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "not valid YAML" in result.output
    wrong_repo = tmp_path / "other.yaml"
    wrong_repo.write_text(
        "version: 1\ncvmfs_repo: other.repo\ninput: ['http://127.0.0.1:9/a/b:1']\n"
    )
    result = CliRunner().invoke(app, ["sync", str(wrong_repo), "--repo", str(publisher.repo_dir)])
    assert result.exit_code == 1 and "other.repo" in result.output
    assert "Traceback" not in result.output


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


# -- MLflow: registered model versions and aliases ------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on loopback with a SQLite backend (on tmpfs when there is one)."""
    pytest.importorskip("mlflow")
    if shutil.which("mlflow") is None:
        pytest.skip("the mlflow command is not installed")
    root = tmp_path_factory.mktemp("mlflow-server")
    shm = Path("/dev/shm")
    db_dir = Path(tempfile.mkdtemp(dir=shm)) if os.access(shm, os.W_OK) else root
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db_dir}/mlflow.db",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if HTTP.request("GET", f"{url}/health", timeout=2, retries=False).status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
        shutil.rmtree(db_dir, ignore_errors=True)


def log_version(url: str, value: float, tmp: Path) -> str:
    """Log and register a tiny pyfunc model in MLflow; its new version number."""
    import mlflow

    code = Path(tempfile.mkdtemp(dir=tmp)) / "model_code.py"
    code.write_text(
        "import mlflow\nfrom mlflow.pyfunc import PythonModel\n"
        f"class M(PythonModel):\n    def predict(self, context, x, params=None):\n"
        f"        return {value}\nmlflow.models.set_model(M())\n"
    )
    # MLflow's tracking URI is process-wide (and copied to the environment): restore it, or
    # every later MLflow test in this process would talk to this (stopped) server.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(url)
    try:
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                registered_model_name="tiny",
                pip_requirements=["numpy"],
            )
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return str(info.registered_model_version)


@pytest.mark.service
def test_mlflow_versions_and_aliases_follow(
    mlflow_server: str, publisher: Publisher, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    first = log_version(mlflow_server, 1.0, tmp_path)
    client.set_registered_model_alias("tiny", "champion", first)
    spec = parse_wishlist(
        f"version: 1\nmodels:\n  - source: mlflow://{mlflow_server[len('http://') :]}/tiny\n"
        "    name: ml/tiny\n"
    )
    log0 = EventLog()
    report = run_round(publisher, spec, SyncOptions(), log=log0)
    assert report.errors == 0 and report.committed, [e.to_json() for e in log0.events if e.error]
    assert alias_of(publisher, "ml/tiny", "champion") == first
    with published(publisher) as repo:
        record = read_record(repo, ModelRef("ml", "tiny", first))
        assert repo.exists(f"/ml/tiny/{first}/MLmodel")
    assert record.source["registered_model"] == "tiny" and record.extra["mlflow"]["flavors"]

    second = log_version(mlflow_server, 2.0, tmp_path)
    client.set_registered_model_alias("tiny", "champion", second)
    log = EventLog()
    moved = run_round(publisher, spec, SyncOptions(), log=log)
    assert moved.errors == 0 and moved.revision_after == report.revision_after + 1
    assert alias_of(publisher, "ml/tiny", "champion") == second
    assert alias_of(publisher, "ml/tiny", "latest") == second
    assert [e.extra["model"] for e in log.events if e.action == "skip_model"] == [
        f"ml/tiny:{first}"
    ]

    unchanged = run_round(publisher, spec, SyncOptions())
    assert not unchanged.committed


@pytest.mark.service
def test_credentials_from_the_auth_file(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    """A registry behind a Bearer-token front: anonymous fails, the docker/oras auth file works."""
    front = TokenFront(docker_registry.url)
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        oras_push(docker_registry.host, "ml/private:v1", {"w.bin": b"secret"}, tmp_path / "p")
        entry = f"models:\n  - source: http://{front.host}/ml/private:v*\n    name: hep/private\n"
        spec = parse_wishlist(f"version: 1\n{entry}")
        log = EventLog()
        anonymous = run_round(publisher, spec, SyncOptions(auth=AuthFile()), log=log)
        assert anonymous.errors == 1 and not anonymous.committed
        assert "401" in next(e.error for e in log.events if e.status == "error")

        auth_file = tmp_path / "docker" / "config.json"
        auth_file.parent.mkdir()
        token = base64.b64encode(b"alice:secret").decode()
        auth_file.write_text(json.dumps({"auths": {f"http://{front.host}": {"auth": token}}}))
        with_auth = run_round(publisher, spec, SyncOptions(auth=AuthFile.load(auth_file)))
        assert with_auth.errors == 0 and with_auth.committed
        assert model_files(publisher, "/hep/private/v1") == {"w.bin": sha256(b"secret")}
    finally:
        front.shutdown()
        front.server_close()


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


@pytest.mark.service
def test_a_bad_tag_does_not_stop_the_others(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    host, base = docker_registry.host, docker_registry.url
    oras_push(host, "ml/mixed:v1", {"w.bin": b"good"}, tmp_path / "p1")
    evil = push_blob(base, "ml/mixed", b"evil")
    config = push_blob(base, "ml/mixed", b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", **config},
        "layers": [
            {
                "mediaType": "application/octet-stream",
                **evil,
                "annotations": {ANNOTATION_TITLE: "../evil"},
            }
        ],
    }
    push_manifest(base, "ml/mixed", "v2", manifest)
    spec = parse_wishlist(
        f"version: 1\nmodels:\n  - source: http://{host}/ml/mixed:v*\n    name: hep/mixed\n"
    )
    log = EventLog()
    report = run_round(publisher, spec, log=log)
    assert report.errors == 1 and report.committed
    assert "'..'" in next(e.error for e in log.events if e.status == "error")
    assert model_files(publisher, "/hep/mixed/v1") == {"w.bin": sha256(b"good")}
    with published(publisher) as repo:
        assert not repo.exists("/hep/mixed/v2")
        assert repo.readlink("/hep/mixed/latest") == "v1"

    # The tag of a published version moved: versions are immutable, so that is an error.
    oras_push(host, "ml/mixed:v1", {"w.bin": b"changed"}, tmp_path / "p2")
    log = EventLog()
    moved = run_round(publisher, spec, log=log)
    assert moved.errors == 2 and not moved.committed
    assert any("immutable" in e.error for e in log.events)
    assert model_files(publisher, "/hep/mixed/v1") == {"w.bin": sha256(b"good")}


def test_auth_file_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "auth.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                    "registry.example:5000": {"username": "u", "password": "p:with:colons"},
                },
                "credsStore": "desktop",
            }
        )
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    auth = AuthFile.load()
    assert auth.path == path
    assert auth.credentials("registry.hub.docker.com") == ("hub", "pw")
    assert auth.credentials("registry.example:5000") == ("u", "p:with:colons")
    assert auth.credentials("elsewhere.example") == (None, None)
    path.write_text(json.dumps({"auths": {"x.example": {"auth": "not base64!"}}}))
    with pytest.raises(ConfigError, match="not base64"):
        AuthFile.load(path)


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
