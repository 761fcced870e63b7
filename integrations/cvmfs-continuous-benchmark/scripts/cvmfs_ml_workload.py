#!/usr/bin/env python3
"""Load a model file and run one inference; print one JSON line with the times.

The workload behind ``90-cvmfs-ml-onnx.sh`` and ``91-cvmfs-ml-safetensors.sh``. It needs only
numpy plus onnxruntime (ONNX) or safetensors, not cvmfs-ml, so any benchmark node with an LCG
view or a plain Python can run it. It reads the model and writes nothing, so N copies can run
in parallel, as the harness's ``num_threads`` does. Exit 0 on success, 1 with one line on
stderr otherwise.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np

_ONNX_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def _onnx(path: str) -> tuple[float, float, str]:
    import onnxruntime as ort

    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    rng = np.random.default_rng(0)  # the same inputs in every copy: outputs comparable
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = _ONNX_DTYPES.get(spec.type)
        if dtype is None:
            raise ValueError(f"input {spec.name} has type {spec.type}, not supported here")
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    outputs = session.run(None, feeds)
    done = time.perf_counter()
    digest = hashlib.sha256()
    for out in outputs:
        digest.update(np.ascontiguousarray(out).tobytes())
    return loaded - started, done - started, digest.hexdigest()


def _safetensors(path: str) -> tuple[float, float, str]:
    from safetensors import safe_open

    started = time.perf_counter()
    digest = hashlib.sha256()
    with safe_open(path, framework="numpy") as f:
        for name in sorted(f.keys()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(f.get_tensor(name)).tobytes())
    loaded = time.perf_counter()
    return loaded - started, loaded - started, digest.hexdigest()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: cvmfs_ml_workload.py MODEL [THREAD-ID]", file=sys.stderr)
        return 2
    path = argv[1]
    try:
        load = _safetensors if path.endswith(".safetensors") else _onnx
        load_s, first_s, digest = load(path)
    except Exception as exc:  # one line for the harness's log, whatever failed
        print(f"cvmfs-ml workload: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"model": path, "thread": argv[2] if len(argv) > 2 else None,
                      "load_s": round(load_s, 4), "first_inference_s": round(first_s, 4),
                      "output_sha256": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
