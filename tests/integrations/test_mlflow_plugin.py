"""``mlflow.pyfunc.load_model("cvmfs://...")`` through our ``mlflow.artifact_repository`` plugin.

The plugin is found the way MLflow finds any plugin, through the entry point: the tests put a
``*.dist-info`` holding our ``entry_points.txt`` on ``PYTHONPATH`` of a fresh process (MLflow
reads entry points when it is imported), as the installed package's metadata would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model

from .conftest import FQRN, HIDDEN, Site

pytestmark = pytest.mark.service

ENTRY_POINT = "cvmfs = cvmfs_ml.integrations.mlflow_artifacts:CvmfsArtifactRepository"

LOAD = """
import sys, numpy as np, mlflow.pyfunc
x = np.linspace(-1, 1, 2 * {hidden}, dtype=np.float32).reshape(2, {hidden})
out = mlflow.pyfunc.load_model(sys.argv[1]).predict({{"x": x}})
np.save(sys.argv[2], out["y"] if isinstance(out, dict) else np.asarray(out))
"""


def _plugin_env(site: Site, tmp_path: Path) -> dict[str, str]:
    info = tmp_path / "plugin" / "cvmfs_ml_mlflow_plugin-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cvmfs-ml-mlflow-plugin\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(f"[mlflow.artifact_repository]\n{ENTRY_POINT}\n")
    path = os.pathsep.join([str(info.parent), os.environ.get("PYTHONPATH", "")])
    return {**site.env, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}"}


def _publish_mlflow_model(site: Site, tmp_path: Path) -> np.ndarray:
    """An MLflow ONNX-flavour model published as ``ml/mlp:1.0`` (alias ``prod``); its output."""
    import mlflow.onnx
    import mlflow.pyfunc
    import onnx

    folder = tmp_path / "mlflow-model"
    model = onnx.load(str(site.originals["1.0"] / "model.onnx"))
    mlflow.onnx.save_model(model, str(folder), save_as_external_data=False)
    publish_model(site.publisher, folder, ModelRef("ml", "mlp", "1.0"), aliases=("prod",))
    x = np.linspace(-1, 1, 2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
    return np.asarray(mlflow.pyfunc.load_model(str(folder)).predict({"x": x})["y"])


def _load(env: dict[str, str], uri: str, out: Path) -> np.ndarray:
    result = subprocess.run(
        [sys.executable, "-c", LOAD.format(hidden=HIDDEN), uri, str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


def test_pyfunc_load_model_from_cvmfs_uri(site: Site, tmp_path: Path) -> None:
    expected = _publish_mlflow_model(site, tmp_path)
    env = _plugin_env(site, tmp_path)
    for n, uri in enumerate([f"cvmfs://{FQRN}/ml/mlp/1.0", f"cvmfs://{FQRN}/ml/mlp:prod"]):
        got = _load(env, uri, tmp_path / f"out{n}.npy")
        np.testing.assert_array_equal(got, expected)
    # `mlflow artifacts download` (the CLI) through the same plugin
    dest = tmp_path / "downloaded"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "artifacts", "download",
         "-u", f"cvmfs://{FQRN}/ml/mlp:prod", "-d", str(dest)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = dest / "mlp:prod"  # MLflow names the folder after the URI's last component
    assert (got / "MLmodel").is_file() and (got / "model.onnx").is_file()
    assert not (got / ".cvmfscatalog").exists()


def test_pyfunc_load_model_through_a_mount(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    expected = _publish_mlflow_model(site, tmp_path)
    mount_site()
    env = _plugin_env(site, tmp_path)
    env["CVMFS_ML_CONFIG"] = str(tmp_path / "absent.conf")  # the mount alone must suffice
    got = _load(env, f"cvmfs://{FQRN}/ml/mlp:prod", tmp_path / "out.npy")
    np.testing.assert_array_equal(got, expected)


def test_plugin_is_read_only_and_refuses_traversal(site: Site) -> None:
    from mlflow.exceptions import MlflowException

    from cvmfs_ml.integrations.mlflow_artifacts import CvmfsArtifactRepository

    os.environ["CVMFS_ML_CONFIG"] = str(site.config)
    try:
        repo = CvmfsArtifactRepository(f"cvmfs://{FQRN}/hep/mlp:prod")
        names = [(f.path, f.is_dir) for f in repo.list_artifacts()]
        assert ("model.onnx", False) in names and all(".cvmfscatalog" not in n for n, _ in names)
        with pytest.raises(MlflowException, match="read-only"):
            repo.log_artifact(__file__)
        with pytest.raises(MlflowException, match="not allowed"):
            repo.list_artifacts("../../..")
        with pytest.raises(MlflowException):
            CvmfsArtifactRepository("cvmfs://../etc")
    finally:
        del os.environ["CVMFS_ML_CONFIG"]


def test_registered_model_to_repository_to_load_model_end_to_end(
    site: Site, tmp_path: Path
) -> None:
    """docs/integrations.md's MLflow path, step by step with the real commands: register a
    model in a tracking server, ``model ingest models:/NAME@ALIAS``, ``model alias``, then
    ``mlflow.pyfunc.load_model("cvmfs://...")`` over HTTP gives the registered model's output."""
    import mlflow.onnx
    import onnx

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = client.create_experiment("e2e", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_tracking_uri(tracking)
    try:
        with mlflow.start_run(experiment_id=experiment):
            mlflow.onnx.log_model(onnx.load(str(site.originals["2.0"] / "model.onnx")),
                                  name="model", registered_model_name="tagger",
                                  save_as_external_data=False)  # fmt: skip
        client.set_registered_model_alias("tagger", "champion", "1")
        x = np.linspace(-1, 1, 2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
        expected = np.asarray(mlflow.pyfunc.load_model("models:/tagger/1").predict({"x": x})["y"])
    finally:
        mlflow.set_tracking_uri(None)
    repo = str(site.publisher.repo_dir)
    for args in (["model", "ingest", "models:/tagger@champion", "--repo", repo,
                  "--as", "ml/tagger:1", "--tracking-uri", tracking],
                 ["model", "alias", repo, "ml/tagger", "prod", "1"]):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", *args], env=site.env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    env = _plugin_env(site, tmp_path)
    got = _load(env, f"cvmfs://{FQRN}/ml/tagger:prod", tmp_path / "out.npy")
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, _load(env, f"cvmfs://{FQRN}/ml/tagger/1",
                                             tmp_path / "out1.npy"))  # fmt: skip


def test_a_link_that_cannot_be_followed_does_not_hide_the_model(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    """One dangling link in a version folder made the whole listing empty (MLflow then found no
    ``MLmodel``), one leading out of the repository failed it, and one to a folder (``..``,
    ``.``) was downloaded whole or for ever; such links are left out, as ``kserve-init`` does not
    follow them in a copy, and the model loads (client and mount)."""
    expected = _publish_mlflow_model(site, tmp_path)
    with site.publisher.transaction() as txn:
        txn.symlink("/ml/mlp/1.0/nothing.bin", "missing.bin")
        txn.symlink("/ml/mlp/1.0/passwd", "/etc/passwd")
        txn.symlink("/ml/mlp/1.0/up", "../../../../../../..")
        txn.symlink("/ml/mlp/1.0/all", "../..")  # the repository's root: not downloaded whole
        txn.symlink("/ml/mlp/1.0/loop", ".")  # nor downloaded into itself for ever
        txn.commit()
    env = _plugin_env(site, tmp_path)
    got = _load(env, f"cvmfs://{FQRN}/ml/mlp:prod", tmp_path / "client.npy")
    np.testing.assert_array_equal(got, expected)
    mount_site()
    mounted = _load(env, f"cvmfs://{FQRN}/ml/mlp:prod", tmp_path / "mount.npy")
    np.testing.assert_array_equal(mounted, expected)
