#!/bin/bash
# cvmfs-ml workload for CVMFS's continuous benchmarking: read every tensor of a safetensors
# file from /cvmfs (the access pattern of transformers' loaders). Reads only: safe as N
# parallel copies. Exit 0 on success. CVMFS_ML_BENCH_SAFETENSORS overrides the model.
set -euo pipefail
MODEL="${CVMFS_ML_BENCH_SAFETENSORS:-/cvmfs/model-registry.cern.ch/bench/llm/latest/model.safetensors}"
exec python3 "$(dirname "$0")/cvmfs_ml_workload.py" "$MODEL" "$@"
