"""Generated benchmark models run in onnxruntime, have the requested size and are reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from cvmfs_ml.bench.generators import (
    example_inputs,
    fine_tune_variant,
    llm_layout,
    make_llm_onnx,
    make_mlp_onnx,
    make_safetensors,
)

SMALL = 8 * 2**20


def _run(model: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, example_inputs(session))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name != "model.onnx")


def test_mlp_runs_and_is_deterministic(tmp_path: Path) -> None:
    a = make_mlp_onnx(tmp_path / "a.onnx", hidden=64, layers=3, seed=7)
    b = make_mlp_onnx(tmp_path / "b.onnx", hidden=64, layers=3, seed=7)
    c = make_mlp_onnx(tmp_path / "c.onnx", hidden=64, layers=3, seed=8)
    assert _sha(a) == _sha(b) != _sha(c)
    first, second = _run(a), _run(a)
    assert first.shape == (1, 64)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llm_onnx(tmp_path_factory.mktemp("llm") / "m", total_bytes=SMALL, seed=3)


def test_small_llm_has_requested_size_in_one_data_file(small_llm: Path) -> None:
    data = small_llm.parent / "model.onnx.data"
    assert sorted(p.name for p in small_llm.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert abs(data.stat().st_size - SMALL) <= 0.05 * SMALL
    assert small_llm.stat().st_size < 200_000  # the graph only; weights are external
    onnx.checker.check_model(str(small_llm))  # also checks the external references


def test_small_llm_runs_finite_and_identical_across_loads(small_llm: Path) -> None:
    first, second = _run(small_llm), _run(small_llm)
    layout = llm_layout(SMALL)
    assert first.shape == (1, 8, layout.vocab)
    assert first.dtype == np.float16
    assert np.isfinite(first).all()
    assert first.astype(np.float32).std() > 0.01  # not all zeros
    np.testing.assert_array_equal(first, second)


def test_llm_is_reproducible_and_seed_dependent(tmp_path: Path, small_llm: Path) -> None:
    again = make_llm_onnx(tmp_path / "again", total_bytes=SMALL, seed=3)
    other = make_llm_onnx(tmp_path / "other", total_bytes=SMALL, seed=4)
    ref = _sha(small_llm.parent / "model.onnx.data")
    assert _sha(again.parent / "model.onnx.data") == ref
    assert _sha(other.parent / "model.onnx.data") != ref


def test_weights_look_like_initialised_weights(small_llm: Path) -> None:
    from onnx.numpy_helper import to_array

    model = onnx.load(str(small_llm))  # loads the external data into memory
    weights = {t.name: to_array(t) for t in model.graph.initializer}
    q = weights["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    assert abs(float(q.std()) - 0.02) < 0.002
    assert abs(float(q.mean())) < 0.002
    norm = weights["model.layers.0.input_layernorm.weight"].astype(np.float32)
    assert abs(float(norm.mean()) - 1.0) < 0.01
    # every tensor has its own stream: no two projections share bytes
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(q.astype(np.float16), k)


def test_per_tensor_external_files(tmp_path: Path) -> None:
    model = make_llm_onnx(tmp_path / "pt", total_bytes=4 * 2**20, one_file=False, seed=1)
    layout = llm_layout(4 * 2**20)
    files = {p.name for p in model.parent.iterdir()} - {"model.onnx"}
    assert files == {t.name for t in layout.tensors}
    assert abs(_data_bytes(model.parent) - 4 * 2**20) <= 0.05 * 4 * 2**20
    assert np.isfinite(_run(model)).all()


def test_float32_and_inline_variants_run(tmp_path: Path) -> None:
    f32 = make_llm_onnx(tmp_path / "f32", total_bytes=4 * 2**20, dtype="float32")
    out = _run(f32)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    inline = make_llm_onnx(tmp_path / "inline", total_bytes=2 * 2**20, external_data=False)
    assert [p.name for p in inline.parent.iterdir()] == ["model.onnx"]
    assert abs(inline.stat().st_size - 2 * 2**20) <= 0.05 * 2 * 2**20
    assert np.isfinite(_run(inline)).all()
    with pytest.raises(ValueError):
        make_llm_onnx(tmp_path / "bf16", total_bytes=2**20, dtype="bfloat16")


@pytest.mark.parametrize("total", [2**20, 3 * 2**20 + 12345, 64 * 2**20, 2 * 2**30])
def test_layout_matches_budget(total: int) -> None:
    layout = llm_layout(total)
    assert layout.layers >= 1 and layout.hidden % 64 == 0
    assert abs(layout.nbytes - total) <= max(2 * layout.hidden * 2, 0.01 * total)


def test_safetensors_size_and_contents(tmp_path: Path) -> None:
    path = make_safetensors(tmp_path / "m.safetensors", SMALL, seed=5)
    assert abs(path.stat().st_size - SMALL) <= 0.05 * SMALL
    tensors = load_file(str(path))
    layout = llm_layout(SMALL)
    assert set(tensors) == {t.name for t in layout.tensors}
    head = tensors["lm_head.weight"]
    assert head.dtype == np.float16
    assert head.shape == (layout.vocab, layout.hidden)  # torch orientation [out, in]
    assert abs(float(head.astype(np.float32).std()) - 0.02) < 0.002
    assert _sha(make_safetensors(tmp_path / "again.safetensors", SMALL, seed=5)) == _sha(path)


def test_safetensors_bfloat16_and_float32(tmp_path: Path) -> None:
    bf16 = make_safetensors(tmp_path / "b.safetensors", 2**20, dtype="bfloat16")
    f32 = make_safetensors(tmp_path / "f.safetensors", 2**20, dtype="float32")
    assert len(load_file(str(bf16))) == len(llm_layout(2**20, dtype="bfloat16").tensors)
    weights = load_file(str(f32))["lm_head.weight"]
    assert weights.dtype == np.float32 and abs(float(weights.std()) - 0.02) < 0.002


def test_fine_tune_variant_changes_only_chosen_tensors(tmp_path: Path, small_llm: Path) -> None:
    result = fine_tune_variant(small_llm.parent, tmp_path / "ft", fraction=0.1, seed=2)
    assert result.changed and result.changed_fraction >= 0.1
    base = {t.name: t for t in onnx.load(str(small_llm)).graph.initializer}
    tuned = {t.name: t for t in onnx.load(str(result.folder / "model.onnx")).graph.initializer}
    for name, tensor in base.items():
        same = tensor.raw_data == tuned[name].raw_data
        assert same == (name not in result.changed), name
    assert np.isfinite(_run(result.folder / "model.onnx")).all()
    with pytest.raises(FileExistsError):
        fine_tune_variant(small_llm.parent, result.folder)


def test_fine_tune_variant_on_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_safetensors(src / "model.safetensors", 2**20, seed=1)
    result = fine_tune_variant(src, tmp_path / "dst", fraction=0.3, seed=4)
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(result.folder / "model.safetensors"))
    changed = {name.split(":", 1)[1] for name in result.changed}
    assert changed
    for name in before:
        assert np.array_equal(before[name], after[name]) == (name not in changed), name


def test_example_inputs_shapes(tmp_path: Path) -> None:
    mlp = make_mlp_onnx(tmp_path / "mlp.onnx", hidden=32)
    assert {k: v.shape for k, v in example_inputs(mlp, batch=4).items()} == {"x": (4, 32)}
    llm = make_llm_onnx(tmp_path / "llm", total_bytes=2**20)
    inputs = example_inputs(llm, batch=2, seq=5)
    assert inputs["hidden_states"].shape == (2, 5, llm_layout(2**20).hidden)
    assert inputs["hidden_states"].dtype == np.float16
