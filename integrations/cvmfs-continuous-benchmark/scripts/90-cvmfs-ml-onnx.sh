#!/bin/bash
# cvmfs-ml workload for CVMFS's continuous benchmarking: load an ONNX model from /cvmfs with
# onnxruntime and run one inference. Reads only: safe as N parallel copies. Exit 0 on success.
# The model defaults to the registry's benchmark model; CVMFS_ML_BENCH_ONNX overrides it.
# An optional first argument (the harness's thread id, `send-thread-id: true`) is passed on.
set -euo pipefail
MODEL="${CVMFS_ML_BENCH_ONNX:-/cvmfs/model-registry.cern.ch/bench/part/latest/model.onnx}"
exec python3 "$(dirname "$0")/cvmfs_ml_workload.py" "$MODEL" "$@"
