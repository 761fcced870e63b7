"""``bench run --model``: the suite measures a user's model, with the loader its format needs.

Three models made here (an ONNX file, a safetensors file, a Hugging Face folder with random
weights) are measured from local disk and through a real FUSE mount; every measurement must
succeed and give the same outputs from both, and unsupported input is refused in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.bench.generators import make_mlp_onnx, make_safetensors
from cvmfs_ml.bench.zoo import user_model
from cvmfs_ml.errors import ConfigError


def _hf_folder(path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(path)


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_user_model_picks_the_runtime_from_the_format(tmp_path: Path) -> None:
    make_mlp_onnx(tmp_path / "net.onnx")
    make_safetensors(tmp_path / "w.safetensors", total_bytes=2**20)
    (tmp_path / "notes.txt").write_text("not a model")
    assert user_model(tmp_path / "net.onnx").name == "net"
    with pytest.raises(ConfigError, match="cannot be loaded by the benchmark"):
        user_model(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="no such file"):
        user_model(tmp_path / "absent.onnx")
    neither = tmp_path / "neither"  # a folder that is neither ONNX nor Hugging Face
    neither.mkdir()
    (neither / "readme.md").write_text("hello")
    with pytest.raises(ConfigError, match=r"one \.onnx file"):
        user_model(neither)


@pytest.mark.service
@pytest.mark.slow
def test_bench_run_measures_user_models_locally_and_through_fuse(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        if os.environ.get("CI"):
            pytest.fail("CI must provide FUSE")
        pytest.skip("no FUSE here")
    onnx = tmp_path / "in" / "tagger.onnx"
    onnx.parent.mkdir()
    make_mlp_onnx(onnx)
    weights = tmp_path / "in" / "weights.safetensors"
    make_safetensors(weights, total_bytes=4 * 2**20)
    hf = tmp_path / "in" / "tiny-bert"
    _hf_folder(hf)
    out = tmp_path / "out"
    proc = _cli("bench", "run", "--model", str(onnx), "--model", str(weights), "--model",
                str(hf), "--modes", "local,fuse", "--states", "cold,hot", "--repeats", "1",
                "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == [] and (out / "work").is_dir()  # work folder under --out
    by_model: dict[str, set[str]] = {}
    for m in doc["measurements"]:
        assert m["ok"], m
        by_model.setdefault(m["model"], set()).add(m["output_sha256"])
    assert set(by_model) == {"tagger", "weights", "tiny-bert"}
    assert all(len(digests) == 1 for digests in by_model.values()), by_model
    runtimes = {m["name"]: m["runtime"] for m in doc["models"]}
    assert runtimes == {"tagger": "onnxruntime", "weights": "safetensors",
                        "tiny-bert": "transformers"}
    assert onnx.read_bytes()  # the user's files are untouched
    assert {(m["model"], m["mode"]) for m in doc["measurements"]} == {
        (name, mode) for name in by_model for mode in ("local", "fuse")}


def test_bench_run_refuses_a_bare_ref_and_a_bad_model_in_one_line(tmp_path: Path) -> None:
    for arg, words in (("a/b:1", "needs its repository"),
                       (str(tmp_path / "nothing.onnx"), "no such file")):
        proc = _cli("bench", "run", "--model", arg, "--out", str(tmp_path / "o"), timeout=120)
        assert proc.returncode != 0
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_model_no_loader_reads_fails_in_one_line(tmp_path: Path) -> None:
    """Every cell failing (a safetensors file cut short: its header says more bytes than there
    are) is exit 1 and one line naming the first failure, not one error line per cell and
    exit 0."""
    cut = tmp_path / "cut.safetensors"
    make_safetensors(cut, total_bytes=2**20)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    proc = _cli("bench", "run", "--model", str(cut), "--modes", "local", "--states", "cold",
                "--repeats", "2", "--out", str(tmp_path / "o"), "--quiet", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: all 2 measurements failed"), lines
    assert "cut/local/loopback/cold" in lines[0] and "Traceback" not in proc.stderr
