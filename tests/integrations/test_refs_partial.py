"""A materialisation killed half way leaves nothing behind for long.

A copy is made in a staging folder beside its destination (``materialised/<fqrn>/<ns>/<name>/``)
and renamed into place when complete. A process that cannot unwind (``kill -9``, the OOM killer)
left that folder, half a model in it, for ever. Each staging folder now carries a lock its
process holds (as sync's scratch folders do); the next copy made there removes the folders whose
lock nobody holds, and never one a live process is filling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from waiting import wait_until

from .conftest import FQRN, Site

pytestmark = pytest.mark.service

# A process filling a staging folder the way a copy does (the real staging code), that tells
# where and then waits to be killed.
_STAGER = """
import sys, threading
from pathlib import Path
from cvmfs_ml.models.materialise import _staging

with _staging(Path(sys.argv[1])) as stage:
    (stage / "model.onnx").write_bytes(b"half a model")
    Path(sys.argv[2]).write_text(str(stage))
    threading.Event().wait(300)
"""


def _stager(dest: Path, told: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-c", _STAGER, str(dest), str(told)], env=env)
    try:
        wait_until(lambda: told.exists() and told.read_text(), 60, "the staging folder made")
    except BaseException:
        process.kill()
        process.wait(timeout=60)
        raise
    return process, Path(told.read_text())


def test_a_killed_copy_leaves_no_staging_folder_after_the_next(site: Site, tmp_path: Path) -> None:
    models = tmp_path / "cache" / "materialised" / FQRN / "hep" / "mlp"  # site's CVMFS_CACHE_BASE
    killed, left = _stager(models / "1.0", tmp_path / "killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert (left / "model.onnx").exists()  # what it left
    live, filling = _stager(models / "2.0", tmp_path / "live")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml.cli", "model", "path", f"cvmfs://{FQRN}/hep/mlp:1.0",
             "--copy"], env=site.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()) == models / "1.0"
        assert (filling / "model.onnx").read_bytes() == b"half a model"  # a live one: kept
        others = {p.name for p in models.iterdir() if not p.name.startswith(filling.name)}
        assert others == {"1.0"}, others
    finally:
        live.kill()
        live.wait(timeout=60)
