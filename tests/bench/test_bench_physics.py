"""Particle Transformer and ParticleNet built as particle-transformer.md describes (slow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.bench.generators import example_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _needs_torch() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("weaver.nn.model.ParticleTransformer")


def _params(module: object) -> int:
    return sum(p.numel() for p in module.parameters())  # type: ignore[attr-defined]


def _softmax_ok(model: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for batch, particles in ((1, 128), (3, 50)):
        (out,) = session.run(None, example_inputs(session, batch=batch, particles=particles))
        assert out.shape == (batch, 10)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_particle_transformer(tmp_path: Path) -> None:
    from cvmfs_ml.bench.physics import build_particle_transformer, make_particle_transformer_onnx

    assert _params(build_particle_transformer()) == 2_143_486
    first = make_particle_transformer_onnx(tmp_path / "a.onnx")
    second = make_particle_transformer_onnx(tmp_path / "b.onnx")
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(second.read_bytes()).hexdigest()  # reproducible
    assert abs(first.stat().st_size - 8_747_515) < 100_000
    assert set(example_inputs(first)) == {"pf_features", "pf_vectors", "pf_mask"}
    _softmax_ok(first)


def test_particlenet(tmp_path: Path) -> None:
    from cvmfs_ml.bench.physics import build_particlenet, make_particlenet_onnx

    assert _params(build_particlenet()) == 370_156
    model = make_particlenet_onnx(tmp_path / "pnet.onnx")
    assert set(example_inputs(model)) == {"pf_points", "pf_features", "pf_mask"}
    _softmax_ok(model)


def test_missing_torch_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from cvmfs_ml.bench import physics

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        physics.build_particle_transformer()
