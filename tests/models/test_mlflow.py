"""MLflow ingest: log a model into a local MLflow (SQLite backend), register it, publish
``models:/NAME/1`` and load it back with ``mlflow.pyfunc.load_model`` from files read out of
the published repository."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.errors import FormatError, NotFoundError, UnsafeInputError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.mlflow import (
    _safe_uri,
    describe_folder,
    ingest_mlflow,
    mlflow_metadata,
    parse_models_uri,
    read_mlmodel,
)
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings


def _require_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mlflow-skinny is not installed; CI must provide it (see .ci/run)")
        pytest.skip("mlflow-skinny is not installed")
    return mlflow


MODEL_CODE = textwrap.dedent(
    """
    import numpy as np
    import mlflow
    from mlflow.pyfunc import PythonModel


    class Doubler(PythonModel):
        def predict(self, context, model_input, params=None):
            return np.asarray(model_input, dtype=np.float32) * 2


    mlflow.models.set_model(Doubler())
    """
)
X = np.array([[1.0, 2.0], [3.0, 4.5]], dtype=np.float32)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SQLite-backed MLflow with ``tiny`` version 1 registered (alias ``champion``)."""
    mlflow = _require_mlflow()
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("mlflow")
    # MLflow creates its schema with ~50 fsync-heavy migrations: on tmpfs when there is one.
    shm = Path("/dev/shm")
    db_dir = Path(tempfile.mkdtemp(dir=shm)) if os.access(shm, os.W_OK) else root
    uri = f"sqlite:///{db_dir}/mlflow.db"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("cvmfs-ml", artifact_location=str(root / "art"))
        code = root / "model_code.py"
        code.write_text(MODEL_CODE)
        with mlflow.start_run(experiment_id=experiment) as run:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                signature=infer_signature(X, X * 2),
                registered_model_name="tiny",
                pip_requirements=["numpy"],  # inferring them runs a subprocess: seconds
            )
        client.set_registered_model_alias("tiny", "champion", "1")
        yield {"uri": uri, "run_id": run.info.run_id, "info": info, "client": client}
    finally:
        if db_dir != root:
            shutil.rmtree(db_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    settings = PublishSettings(compression=Compression.ZLIB, workers=2)
    return create_repository(tmp_path / "srv", "models.test", settings=settings)


def published(publisher: Publisher) -> Repository:
    return Repository.open(
        publisher.repo_dir,
        public_key=publisher.keys.paths.master_public,
        cache=publisher.repo_dir.parent / "read-cache",
    )


def materialise(publisher: Publisher, path: str, dest: Path) -> Path:
    """Copy the published folder ``path`` out of the repository, file by file."""
    with published(publisher) as repo:
        for entry in repo.walk(path):
            if entry.is_regular and not entry.path.endswith("/.cvmfscatalog"):
                target = dest / entry.path[len(path) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(repo.read_bytes(entry.path))
    return dest


def repo_state(publisher: Publisher) -> tuple[int, int]:
    objects = sum(len(files) for _, _, files in os.walk(publisher.repo_dir / "data"))
    return publisher.manifest().revision, objects


def test_registered_model_round_trip(
    tracking: dict[str, Any], publisher: Publisher, tmp_path: Path
) -> None:
    import mlflow

    result = ingest_mlflow(publisher, "models:/tiny/1", ModelRef.parse("ml/tiny:1"))
    assert not result.skipped
    with published(publisher) as repo:
        record = read_record(repo, ModelRef.parse("ml/tiny:1"))
    assert record.source["type"] == "mlflow"
    assert record.source["registered_model"] == "tiny"
    assert record.source["model_version"] == "1"
    assert record.source["run_id"] == tracking["run_id"]
    assert record.source["model_uuid"]
    meta = record.extra["mlflow"]
    assert "python_function" in meta["flavors"]
    # The signature is JSON in model.json, not the JSON-in-YAML strings of MLmodel.
    # Whatever MLflow recorded (a tensor spec here; MLflow versions differ in what they infer
    # for code-based models), model.json carries the same, as JSON.
    recorded = mlflow.models.get_model_info("models:/tiny/1").signature.to_dict()
    assert meta["signature"]["inputs"] == json.loads(recorded["inputs"])
    assert meta["signature"]["inputs"]
    assert meta["signature"]["params"] is None

    folder = materialise(publisher, "/ml/tiny/1", tmp_path / "from-cvmfs")
    assert (folder / "MLmodel").is_file()
    model = mlflow.pyfunc.load_model(str(folder))
    np.testing.assert_array_equal(model.predict(X), X * 2)
    schema = json.loads(json.dumps(model.metadata.get_input_schema().to_dict()))
    assert schema == meta["signature"]["inputs"]

    # Same model again, by version or by alias: nothing written.
    before = repo_state(publisher)
    assert ingest_mlflow(publisher, "models:/tiny/1", ModelRef.parse("ml/tiny:1")).skipped
    assert ingest_mlflow(publisher, "models:/tiny@champion", ModelRef.parse("ml/tiny:1")).skipped
    assert repo_state(publisher) == before


def test_mlmodel_folder_and_cli(
    tracking: dict[str, Any], publisher: Publisher, tmp_path: Path
) -> None:
    import mlflow
    import typer

    from cvmfs_ml.cli.ingest import model_ingest

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/tiny/1", dst_path=str(tmp_path / "dl")
        )
    )
    result = ingest_mlflow(publisher, local, ModelRef.parse("ml/local:1"), aliases=())
    assert result.source["uri"] == str(local.resolve())
    assert result.record.extra["mlflow"]["model_uuid"] == result.source["model_uuid"]

    app = typer.Typer()
    app.command()(model_ingest)
    runner = CliRunner()
    args = ["models:/tiny@champion", "--repo", str(publisher.repo_dir), "--as", "ml/cli:2"]
    out = runner.invoke(app, [*args, "--json", "--tracking-uri", tracking["uri"]])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["skipped"] is False and data["source"]["alias"] == "champion"
    assert data["source"]["model_version"] == "1"
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.stdout
    missing = runner.invoke(app, ["models:/nope/1", "--repo", str(publisher.repo_dir), "--as",
                                  "ml/nope:1"])  # fmt: skip
    assert missing.exit_code == 1 and "nope" in missing.output
    bad = runner.invoke(app, [str(tmp_path), "--repo", str(publisher.repo_dir), "--as", "a/b:1"])
    assert bad.exit_code == 1 and "cannot ingest" in bad.output


def test_unknown_model_is_not_found(tracking: dict[str, Any], publisher: Publisher) -> None:
    with pytest.raises(NotFoundError):
        ingest_mlflow(publisher, "models:/does-not-exist/1", ModelRef.parse("ml/x:1"))
    assert publisher.manifest().revision == 0


def test_a_tracking_server_that_is_down_fails_within_a_bound(publisher: Publisher) -> None:
    """MLflow retries a refused connection 7 times with a doubling backoff: ``model ingest
    models:/...`` against a server that is down took 4 minutes 10 seconds to say so."""
    import socket
    import subprocess
    import sys
    import time

    _require_mlflow()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connections are refused
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "model", "ingest", "models:/tiny/1", "--repo",
         str(publisher.repo_dir), "--as", "ml/tiny:1", "--tracking-uri",
         f"http://127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert "models:/tiny/1" in lines[0] and took < 60, (took, lines[0])
    assert publisher.manifest().revision == 0


# -- no MLflow needed ----------------------------------------------------------------------------
def test_an_mlmodel_error_never_shows_a_file_of_the_machine(tmp_path: Path) -> None:
    """An MLflow folder whose ``MLmodel`` was a link to a local file (a private key) was read,
    and PyYAML's error, quoting the offending lines, put the key on stderr (a CI log)."""
    key = tmp_path / "id_rsa"
    key.write_text("-----BEGIN KEY-----\nSECRETSECRET: [x\n")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").symlink_to(key)
    with pytest.raises(UnsafeInputError, match="outside") as refused:
        read_mlmodel(folder)
    assert "SECRET" not in str(refused.value)
    (folder / "MLmodel").unlink()
    shutil.copy(key, folder / "MLmodel")  # a broken MLmodel of its own: where, not what
    with pytest.raises(FormatError, match=r"not YAML: .*line 2, column 1") as broken:
        read_mlmodel(folder)
    assert "SECRET" not in str(broken.value) and "BEGIN" not in str(broken.value)


def test_ingest_prints_what_the_mlmodel_says_as_text(publisher: Publisher, tmp_path: Path) -> None:
    """The ``model_uuid`` of an MLmodel (whoever logged it) was printed raw: an escape sequence
    drove the publisher's terminal and a newline split the one-line report."""
    import typer

    from cvmfs_ml.cli.ingest import model_ingest

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text('flavors: {}\nmodel_uuid: "abc\\e]0;owned\\a\\nline two"\n')
    app = typer.Typer()
    app.command()(model_ingest)
    out = CliRunner().invoke(app, [str(folder), "--repo", str(publisher.repo_dir), "--as", "a/b:1"],
                             color=True)  # as on a terminal: nothing stripped  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(out.stdout.splitlines()) == 1 and "\x1b" not in out.stdout, repr(out.stdout)
    assert "abc\\x1b]0;owned" in out.stdout, repr(out.stdout)


def test_parse_models_uri() -> None:
    assert parse_models_uri("models:/tiny/3") == ("tiny", "3", None)
    assert parse_models_uri("models:/my-model@champion") == ("my-model", None, "champion")
    for bad in ("models:/tiny", "models:/tiny/latest", "runs:/abc/model"):
        with pytest.raises(FormatError):
            parse_models_uri(bad)


def test_mlmodel_metadata_without_mlflow(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text(
        textwrap.dedent(
            """\
            flavors:
              onnx: {onnx_version: 1.16.0, data: model.onnx}
              python_function: {loader_module: mlflow.onnx, python_version: 3.11.7}
            model_uuid: 0123abcd
            run_id: r1
            mlflow_version: 2.14.0
            utc_time_created: '2024-06-01 10:00:00.000000'
            signature:
              inputs: '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]'
              outputs: '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1]}}]'
              params: '[{"name": "t", "type": "double", "default": 1.0, "shape": null}]'
            """
        )
    )
    meta = mlflow_metadata(read_mlmodel(tmp_path))
    assert meta["flavors"]["onnx"]["data"] == "model.onnx"
    assert meta["signature"]["outputs"][0]["tensor-spec"]["shape"] == [-1]
    assert meta["signature"]["params"][0]["name"] == "t"
    assert meta["model_uuid"] == "0123abcd"
    with pytest.raises(NotFoundError):
        read_mlmodel(tmp_path / "elsewhere")


def test_hostile_mlmodel_files_are_refused_at_once(tmp_path: Path) -> None:
    """An MLmodel comes with the model, from whoever logged it: a "billion laughs" of YAML
    aliases (nine lines that stand for 10^9 values) once hung the sync in json.dumps, and a huge
    file was read whole. Both are refused before anything walks the tree."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines += ["flavors: {python_function: {loader_module: x}}", "signature: {inputs: *a8}"]
    (tmp_path / "MLmodel").write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match="aliases stand for"):
        describe_folder(tmp_path, {})
    # Aliases as PyYAML writes them for an object that appears twice are fine, and so is a
    # recursive one refused rather than looped over.
    (tmp_path / "MLmodel").write_text(
        "flavors:\n  a: &env {conda: conda.yaml}\n  b: {env: *env}\nmodel_uuid: u1\n"
    )
    assert describe_folder(tmp_path, {}).source["model_uuid"] == "u1"
    (tmp_path / "MLmodel").write_text("flavors: &f {x: *f}\n")
    with pytest.raises(FormatError, match="recursive"):
        describe_folder(tmp_path, {})
    (tmp_path / "MLmodel").write_text("flavors: {}\n" + "# padding\n" * 200_000)
    with pytest.raises(FormatError, match="limit"):
        read_mlmodel(tmp_path)
    (tmp_path / "MLmodel").write_text("flavors: [onnx, python_function]\nmodel_uuid: [1]\n")
    assert describe_folder(tmp_path, {}).description == "MLflow model"  # odd types: no crash
    deep = "[" * 20_000 + "]" * 20_000  # a signature as JSON text: RecursionError in json.loads
    (tmp_path / "MLmodel").write_text(f"flavors: {{}}\nsignature: {{inputs: '{deep}'}}\n")
    assert mlflow_metadata(read_mlmodel(tmp_path))["signature"]["inputs"] == deep  # kept as text


def test_tracking_uri_passwords_are_not_recorded() -> None:
    assert _safe_uri("https://bob:pw@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert _safe_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
