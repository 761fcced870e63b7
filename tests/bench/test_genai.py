"""The generative LLM case: a Phi-3 decoder built here, decoded greedily by onnxruntime-genai."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.bench.genai import GreedyGenerator, make_phi3_genai, phi3_shape

NEEDS = ("torch", "transformers", "onnxruntime_genai", "onnx_ir")


def test_shape_meets_the_weight_budget() -> None:
    for budget in (2 * 2**20, 256 * 2**20, 2**30, 4 * 2**30):
        s = phi3_shape(budget)
        h, i, v, n = (s["hidden_size"], s["intermediate_size"], s["vocab_size"],
                      s["num_hidden_layers"])
        weights = 4 * (2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h))
        assert abs(weights - budget) <= max(0.2 * budget, 2 * 4 * (4 * h * h + 3 * h * i))
        assert h % s["num_attention_heads"] == 0 and n >= 1
    assert phi3_shape(2**30)["vocab_size"] == 32064  # Phi-3's own vocabulary at real sizes


@pytest.mark.slow
def test_built_model_decodes_the_same_tokens_from_a_copy(tmp_path: Path) -> None:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}")
    model = make_phi3_genai(tmp_path / "phi3", 2 * 2**20, seed=3)
    assert (model / "model.onnx").is_file() and (model / "genai_config.json").is_file()
    copy = shutil.copytree(model, tmp_path / "copy")
    first = GreedyGenerator(model, new_tokens=12)
    tokens = first.run()[0]
    assert tokens.shape == (12,) and first.first_token_s is not None
    assert np.array_equal(GreedyGenerator(copy, new_tokens=12).run()[0], tokens)
    other = make_phi3_genai(tmp_path / "other", 2 * 2**20, seed=4)  # other weights, other text
    assert not np.array_equal(GreedyGenerator(other, new_tokens=12).run()[0], tokens)


def test_gpu_note_says_whether_a_cuda_device_exists(tmp_path: Path) -> None:
    from cvmfs_ml.bench.genai import gpu_note

    assert "no CUDA device here" in gpu_note(tmp_path)
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()  # the control node is not a device
    note = gpu_note(tmp_path)
    assert "nvidia0 present" in note and "CPU only" in note


@pytest.mark.slow
def test_a_run_with_the_llm_case_reports_the_gpu_cells(tmp_path: Path) -> None:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}")
    from cvmfs_ml.bench.environment import BenchEnvironment
    from cvmfs_ml.bench.genai import gpu_note
    from cvmfs_ml.bench.profiles import Profile
    from cvmfs_ml.bench.zoo import ModelSpec

    specs = (ModelSpec("phi3-tiny", "genai", size=2 * 2**20),)
    with BenchEnvironment(tmp_path, Profile(name="t", models=specs), log=lambda _m: None) as env:
        env.build(specs)
        assert env.skipped == [gpu_note()]
