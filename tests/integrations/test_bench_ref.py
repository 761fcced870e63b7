"""``cvmfs-ml bench run --model cvmfs://<fqrn>/<ns>/<name>:<alias>``: a published model measured.

The reference is resolved the way ``model path`` resolves it (here: no mount, so a verified
copy from the client's cache, configured by ``CVMFS_ML_CONFIG``); the alias is read once and
names the model ``<name>-<version>``; the measurement's output must equal onnxruntime's on the
original model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FQRN, Site

pytestmark = pytest.mark.service


def bench(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", "bench", "run", *args],
                          env=site.env, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip


def test_bench_run_measures_a_published_version_by_reference(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    local = tmp_path / "local-out"
    proc = bench(site, "--model", f"cvmfs://{FQRN}/hep/mlp:prod", "--modes", "local",
                 "--states", "cold", "--repeats", "1", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == []
    assert [(m["model"], m["mode"], m["ok"]) for m in doc["measurements"]] == [
        ("mlp-1.0", "local", True)]  # prod -> 1.0, read once
    assert [m["runtime"] for m in doc["models"]] == ["onnxruntime"]
    # the same measurement on the original folder gives the same output digest
    proc = bench(site, "--model", str(site.originals["1.0"] / "model.onnx"), "--modes", "local",
                 "--states", "cold", "--repeats", "1", "--out", str(local), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = json.loads((local / "results.json").read_text())["measurements"][0]
    assert doc["measurements"][0]["output_sha256"] == original["output_sha256"]


@pytest.mark.parametrize(("ref", "words"), [
    (f"cvmfs://{FQRN}/hep/mlp:nope", "no such file"),
    (f"cvmfs://{FQRN}/hep/../../etc:1", "'..' are not allowed"),
    ("hep/mlp:1.0", "needs its repository"),
])
def test_bad_references_fail_in_one_line(site: Site, tmp_path: Path, ref: str,
                                         words: str) -> None:
    out = tmp_path / "out"
    proc = bench(site, "--model", ref, "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not out.exists()
