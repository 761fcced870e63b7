"""A real KServe ``ModelServer`` process serving an ONNX model from CVMFS over the v2 protocol.

The server is ``python -m cvmfs_ml.integrations.kserve_server`` on a loopback port; requests go
over HTTP (v2 JSON). It must answer with the original model's output, and after the alias it
serves moves, with the new version's output (it polls where the alias points).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.integrations.kserve_process import RunningServer, running_server, v2_infer
from cvmfs_ml.models.publish import set_alias

from .conftest import FQRN, HIDDEN, Site, onnx_output

pytestmark = pytest.mark.service

X = np.linspace(-1, 1, 2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)


@contextmanager
def model_server(model_dir: str | Path, env: dict[str, str], log: Path) -> Iterator[RunningServer]:
    with running_server(model_dir, model_name="mlp", env=env, log=log, poll_interval=0.5,
                        ready_timeout=120) as server:  # fmt: skip
        yield server


def infer(server: RunningServer) -> tuple[np.ndarray, str | None]:
    outputs, version = v2_infer(server, {"x": X})
    return outputs["y"].astype(np.float32), version


def wait_for_version(server: RunningServer, version: str, timeout: float) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while True:
        y, served = infer(server)
        if served == version:
            return y
        assert time.monotonic() < deadline, f"still serving {served}, not {version}"
        time.sleep(0.25)


def test_server_follows_a_moving_alias_in_a_folder(site: Site, tmp_path: Path) -> None:
    """Alias semantics on a plain folder laid out as in a repository (``prod -> 1.0``)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for version, src in site.originals.items():
        os.symlink(src, tree / version)
    os.symlink("1.0", tree / "prod")
    with model_server(tree / "prod", site.env, tmp_path / "server.log") as server:
        y, served = infer(server)
        assert served == "1.0"
        np.testing.assert_allclose(y, onnx_output(site.originals["1.0"]), rtol=1e-6)
        # An alias moved to something that does not load: the server keeps the old version.
        (tree / "broken").mkdir()
        (tree / "broken" / "model.onnx").write_bytes(b"not onnx")
        os.symlink("broken", tree / "prod.new")
        os.replace(tree / "prod.new", tree / "prod")  # atomic, as a publish is
        log = tmp_path / "server.log"
        deadline = time.monotonic() + 60
        while "alias check failed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert infer(server)[1] == "1.0"
        os.symlink("2.0", tree / "prod.new")
        os.replace(tree / "prod.new", tree / "prod")
        y2 = wait_for_version(server, "2.0", timeout=60)
        np.testing.assert_allclose(y2, onnx_output(site.originals["2.0"]), rtol=1e-6)


def test_server_loads_from_a_mount(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    mount_site()
    alias = site.mounts / FQRN / "hep" / "mlp" / "prod"
    with model_server(alias, site.env, tmp_path / "server.log") as server:
        y, served = infer(server)
        assert served == "1.0"
        np.testing.assert_allclose(y, onnx_output(site.originals["1.0"]), rtol=1e-6)
    # and from a cvmfs:// reference, which finds the mount through CVMFS_MOUNT_DIR
    with model_server(f"cvmfs://{FQRN}/hep/mlp:latest", site.env, tmp_path / "s2.log") as server:
        y, served = infer(server)
        assert served == "2.0"
        np.testing.assert_allclose(y, onnx_output(site.originals["2.0"]), rtol=1e-6)


def test_server_without_a_mount_follows_the_alias(site: Site, tmp_path: Path) -> None:
    """A ``cvmfs://`` reference with nothing mounted: materialised, then re-resolved."""
    with model_server(f"cvmfs://{FQRN}/hep/mlp:prod", site.env, tmp_path / "s.log") as server:
        assert infer(server)[1] == "1.0"
        set_alias(site.publisher, "hep/mlp", "prod", "2.0")
        y = wait_for_version(server, "2.0", timeout=60)
        np.testing.assert_allclose(y, onnx_output(site.originals["2.0"]), rtol=1e-6)


def test_server_on_a_mount_follows_the_alias_after_the_ttl(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    import dataclasses

    # a short TTL from the next revision on
    site.publisher.save_settings(dataclasses.replace(site.publisher.settings, ttl=2))
    # set_alias makes no revision when prod already points at 1.0: publish one, so the mount
    # starts on a revision that carries the short TTL
    with site.publisher.transaction() as txn:
        txn.add_bytes("/hep/mlp/.ttl", b"2\n")
        txn.commit()
    set_alias(site.publisher, "hep/mlp", "prod", "1.0")
    mount_site()
    alias = site.mounts / FQRN / "hep" / "mlp" / "prod"
    with model_server(alias, site.env, tmp_path / "server.log") as server:
        assert infer(server)[1] == "1.0"
        set_alias(site.publisher, "hep/mlp", "prod", "2.0")
        y = wait_for_version(server, "2.0", timeout=60)  # TTL 2 s + what a loaded machine needs
        np.testing.assert_allclose(y, onnx_output(site.originals["2.0"]), rtol=1e-6)


def test_a_cvmfs_reference_on_a_mount_stays_in_the_repository(
    site: Site, mount_site: Callable[[], object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An alias leading out of the repository (``evil -> /``) was followed on the mount with
    ``realpath``: the server walked the node's own disk for ``*.onnx`` and served what it found
    there. ``kserve-init`` and ``model path`` refuse such a link; so does the server now."""
    from cvmfs_ml.errors import FormatError, UnsafeInputError
    from cvmfs_ml.integrations.kserve_server import source_for

    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(site.originals["2.0"] / "model.onnx", outside / "model.onnx")
    with site.publisher.transaction() as txn:
        txn.symlink("/hep/mlp/evil", str(outside))
        txn.symlink("/hep/mlp/up", "..")  # the namespace: every model in it
        txn.commit()
    mount_site()
    monkeypatch.setenv("CVMFS_MOUNT_DIR", str(site.mounts))
    assert source_for(f"cvmfs://{FQRN}/hep/mlp:prod")() == site.mounts / FQRN / "hep/mlp/1.0"
    with pytest.raises(UnsafeInputError, match="outside the repository"):
        source_for(f"cvmfs://{FQRN}/hep/mlp:evil")()
    with pytest.raises(FormatError, match="not a version"):
        source_for(f"cvmfs://{FQRN}/hep/mlp:up")()


@pytest.mark.parametrize(
    ("model_dir", "reason"),
    [
        ("cvmfs://bad name/x", "not a repository name"),  # was a traceback: parsed unguarded
        (f"cvmfs://{FQRN}/hep/../x", "'..' are not allowed"),
        (f"cvmfs://{FQRN}/hep/mlp:9.9", "hep/mlp has 1.0, 2.0, latest, prod"),
    ],
)
def test_a_model_dir_that_cannot_load_is_one_line(
    site: Site, tmp_path: Path, model_dir: str, reason: str
) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.integrations.kserve_server", "--model_name", "mlp",
         "--model_dir", model_dir], env=site.env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("cvmfs-ml kserve_server: cannot load") and reason in lines[0]
