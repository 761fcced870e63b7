"""HDF5 files (and Keras v3 zips, which hold one) described in a child process with bounded
memory and time.

h5py is the HDF5 C library underneath, and a hostile HDF5 file of a few kB can make it allocate
gigabytes before it notices the damage: a fuzzed 6 kB Keras file (one variable-length
attribute whose heap entry claims ~4 GB) took 4 GiB of memory and 5 s before h5py raised
``OSError``. The registry describes files that strangers upload, so a local HDF5 file is
described by ``python -m cvmfs_ml.models.formats.isolated PATH``: the child caps its own
address space (``RLIMIT_AS``) before it imports h5py, the parent bounds its time, and the
description comes back as JSON (never pickle: the child has read hostile bytes). An allocation
past the cap fails inside HDF5, which is then a :class:`ModelFormatError` like any other damage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from cvmfs_ml.models.formats.base import ModelDescription, ModelFormatError, Source, TensorInfo

__all__ = ["MAX_CHILD_MEMORY", "TIMEOUT", "describe_hdf5_in_child"]

MAX_CHILD_MEMORY = 1 << 30
"""Address space of the child: Python, numpy and h5py take about 160 MB of it (VmPeak)."""
TIMEOUT = 120.0
"""Seconds a description may take (a real HDF5 header is described in well under one)."""


_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _tensors(items: Any) -> list[TensorInfo]:
    return [TensorInfo(str(t["name"]), str(t["dtype"]), tuple(t["shape"])) for t in items or []]


def _from_json(data: dict[str, Any]) -> ModelDescription:
    fields = dict(data)
    for key in ("inputs", "outputs", "weights"):
        fields[key] = _tensors(fields.get(key))
    known = ModelDescription.__dataclass_fields__
    return ModelDescription(**{k: v for k, v in fields.items() if k in known})


def describe_hdf5_in_child(path: str) -> ModelDescription:
    """The description of the HDF5 file at ``path``, made by a memory-capped child."""
    # One BLAS thread: OpenBLAS reserves address space per thread when numpy is imported
    # (gigabytes on a many-core node), which would count against the child's cap.
    env = {**os.environ, **dict.fromkeys(_THREAD_VARIABLES, "1")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml.models.formats.isolated", os.fspath(path)],
            capture_output=True, text=True, timeout=TIMEOUT, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ModelFormatError(path, f"describing it took over {TIMEOUT:g} s") from None
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFormatError(path, f"the HDF5 reader failed ({tail[:200]})") from None
    if "error" in answer:
        raise ModelFormatError(path, str(answer["error"]))
    return _from_json(answer["description"])


def _child(path: str) -> dict[str, Any]:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MAX_CHILD_MEMORY, MAX_CHILD_MEMORY))
    from cvmfs_ml.models.formats import hdf5

    try:
        with open(path, "rb") as f:
            description = hdf5.describe_here(f, Source(path, open))
    except (ModelFormatError, MemoryError) as exc:
        reason = exc.reason if isinstance(exc, ModelFormatError) else "out of memory"
        return {"error": str(reason)}
    return {"description": description.to_json(weights=True)}


if __name__ == "__main__":  # pragma: no cover - run as the child above
    print(json.dumps(_child(sys.argv[1])))
