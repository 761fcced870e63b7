"""Valid, NaN-free inputs for any ONNX model the benchmarks run: :func:`example_inputs`.

Also :func:`require_onnx`, the one place that imports ``onnx`` (a benchmark dependency) with an
install hint.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cvmfs_ml.bench.physics import particle_inputs

__all__ = ["example_inputs", "require_onnx"]


def require_onnx() -> Any:
    """The ``onnx`` module, or an ImportError that says how to install it."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a bench dependency
        raise ImportError("the benchmark generators need onnx: pip install onnx") from exc
    return onnx


_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}
_ELEM_TO_TYPE = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)",
                 7: "tensor(int64)", 6: "tensor(int32)", 9: "tensor(bool)", 3: "tensor(int8)",
                 2: "tensor(uint8)"}


def _graph_inputs(model: Any) -> list[tuple[str, str, list[int | str | None]]]:
    """(name, onnx type string, dims) of each real input, from a session or an ONNX file.

    Reading the graph with ``load_external_data=False`` avoids mapping gigabytes of weights
    just to learn the input shapes.
    """
    if hasattr(model, "get_inputs"):
        return [(i.name, i.type, list(i.shape)) for i in model.get_inputs()]
    onnx = require_onnx()
    proto = onnx.load(str(model), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    result = []
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tt.shape.dim
        ]
        result.append((vi.name, _ELEM_TO_TYPE.get(tt.elem_type, "tensor(float)"), dims))
    return result


def example_inputs(model: str | os.PathLike[str] | Any, *, batch: int = 1, seq: int = 8,
                   particles: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid inputs for an ONNX model (a path or an ``onnxruntime.InferenceSession``).

    Dynamic dimensions become small values: the first one ``batch``, the particle axis of
    ``pf_*`` inputs ``particles``, any other ``seq``. Particle inputs get physically sensible,
    wrap-padded values (see :func:`~cvmfs_ml.bench.physics.particle_inputs`); other floats
    are N(0, 1), integers small non-negative ids. Only the names the model declares are
    returned, since exporters drop unused inputs.
    """
    rng = np.random.default_rng(seed)
    specs = _graph_inputs(model)
    out: dict[str, np.ndarray] = {}
    particle = None
    for name, type_str, dims in specs:
        concrete = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                concrete.append(d)
            elif axis == 0:
                concrete.append(batch)
            elif name.startswith("pf_") and axis == 2:
                concrete.append(particles)
            else:
                concrete.append(seq)
        np_type = _ONNX_TO_NUMPY.get(type_str, np.float32)
        if name in ("pf_points", "pf_features", "pf_vectors", "pf_mask") and len(concrete) == 3:
            if particle is None:
                n_feat = next((d[1] for n, _, d in specs if n == "pf_features"
                               and len(d) > 1 and isinstance(d[1], int) and d[1] > 0), 17)
                particle = particle_inputs(concrete[0], concrete[2], rng, n_feat)
            out[name] = particle[name].astype(np_type)
        elif np.issubdtype(np_type, np.floating):
            out[name] = rng.standard_normal(concrete).astype(np_type)
        elif np_type is np.bool_:
            out[name] = np.ones(concrete, np.bool_)
        else:
            out[name] = rng.integers(0, 100, concrete).astype(np_type)
    return out
