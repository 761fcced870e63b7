"""Sync of model artifacts (ORAS, ModelPack) and images from registries and MLflow.

Real parts on loopback: Debian's docker-registry (behind a Bearer-token front for the
credentials test), ``oras`` pushes, ``skopeo`` pushes, and an ``mlflow server`` with a SQLite
backend. Also: a bad tag that does not stop the others, and the docker/oras auth file's forms.
The loop and the webhook are in ``test_sync_loop.py``; the shared helpers in
``model_helpers.py``.
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
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.auth import AuthFile
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.loop import SyncLoop
from cvmfs_ml.sync.wishlist import parse_wishlist
from cvmfs_ml.testing import free_port
from models.oci_helpers import TokenFront, push_blob, push_manifest, push_modelpack
from sync.imagebuild import published, sha256
from sync.model_helpers import HTTP, model_files, oras_push, push_small_image, write_wishlist


def alias_of(publisher: Publisher, model: str, alias: str) -> str:
    with published(publisher) as repo:
        return repo.readlink(f"/{model}/{alias}")


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
    # A wishlist for another repository is a mistake of the command, found before any round:
    # one line, and a loop does not start (it logged the same error every interval, exit 0).
    for loop in ([], ["--loop", "--rounds", "1", "--interval", "1"]):
        args = ["sync", str(wrong_repo), "--repo", str(publisher.repo_dir), *loop]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "other.repo" in result.output, result.output
        assert result.output.count("\n") == 1, result.output
        assert result.output.startswith("cvmfs-ml: "), result.output
    assert "Traceback" not in result.output


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


@pytest.mark.service
def test_the_loop_reads_rotated_credentials(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    """``--loop`` read the auth file once, at start: rotated credentials needed a restart (every
    round a 401 until then). It is read again each round, as the wishlist is; an edit that
    breaks it is one error event, and the credentials read before stay in use."""
    front = TokenFront(docker_registry.url)
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        oras_push(docker_registry.host, "ml/rotated:v1", {"w.bin": b"one"}, tmp_path / "p1")
        wishlist = tmp_path / "wishlist.yaml"
        wishlist.write_text(
            f"version: 1\nmodels:\n  - source: http://{front.host}/ml/rotated:v*\n"
            "    name: hep/rotated\n"
        )
        auth_file = tmp_path / "config.json"

        def write_auth(user_password: bytes) -> None:
            token = base64.b64encode(user_password).decode()
            auth_file.write_text(json.dumps({"auths": {front.host: {"auth": token}}}))

        write_auth(b"alice:expired")
        log = EventLog()
        loop = SyncLoop(publisher, wishlist, options=SyncOptions(auth=AuthFile.load(auth_file)),
                        log=log)  # fmt: skip
        first = loop.run_once()
        assert first is not None and first.errors == 1 and not first.committed

        write_auth(b"alice:secret")  # rotated while the loop runs
        second = loop.run_once()
        assert second is not None and second.errors == 0 and second.committed, [
            e.error for e in log.events if e.status == "error"
        ]
        assert model_files(publisher, "/hep/rotated/v1") == {"w.bin": sha256(b"one")}

        auth_file.write_text('{"auths": {')  # an edit half done
        oras_push(docker_registry.host, "ml/rotated:v2", {"w.bin": b"two"}, tmp_path / "p2")
        before = len(log.events)
        third = loop.run_once()
        assert third is not None and third.errors == 0 and third.committed
        assert model_files(publisher, "/hep/rotated/v2") == {"w.bin": sha256(b"two")}
        broken = [e for e in list(log.events)[before:] if e.status == "error"]
        assert [e.action for e in broken] == ["read_auth"]
        assert str(auth_file) in broken[0].error and "last good" in broken[0].error
        assert "\n" not in broken[0].error
    finally:
        front.shutdown()
        front.server_close()


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
