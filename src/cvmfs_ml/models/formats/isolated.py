"""Model files whose readers can be made to blow up by a few hostile bytes, described in a child
process with bounded memory and time: HDF5 (and Keras v3 zips, which hold one) and PyTorch
archives.

* **HDF5.** h5py is the HDF5 C library underneath, and a hostile HDF5 file of a few kB can make
  it allocate gigabytes before it notices the damage: a fuzzed 6 kB Keras file (one
  variable-length attribute whose heap entry claims ~4 GB) took 4 GiB of memory and 5 s before
  h5py raised ``OSError``.
* **PyTorch.** ``data.pkl`` is unpickled (with stubs for every global, :mod:`._unpickle`), and
  the C unpickler builds whatever the stream says: a 58 kB pickle of 60 million empty dicts took
  7 GB, and a 4.7 kB one nesting a tuple 5 million deep as a dict key crashed the process
  outright (hashing it recurses in C with no depth check: a segfault, nothing on stderr).

The registry describes files that strangers upload, so a local file of these formats is
described by ``python -m cvmfs_ml.models.formats.isolated READER PATH``: the child caps its own
address space (``RLIMIT_AS``) before it reads anything, the parent bounds its time, and the
description comes back as JSON (never pickle: the child has read hostile bytes). An allocation
past the cap fails inside the reader, a crash ends only the child; either is then a
:class:`ModelFormatError` like any other damage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from cvmfs_ml.models.formats.base import ModelDescription, ModelFormatError, Source, TensorInfo

__all__ = ["MAX_CHILD_MEMORY", "READERS", "TIMEOUT", "describe_in_child"]

MAX_CHILD_MEMORY = 1 << 30
"""Address space of the child: Python, numpy and h5py take about 160 MB of it (VmPeak)."""
TIMEOUT = 120.0
"""Seconds a description may take (a real header is described in well under one)."""
READERS = {"hdf5": "HDF5", "pytorch": "PyTorch"}
"""The readers run here: the module of :mod:`cvmfs_ml.models.formats` whose ``describe_here``
the child calls, and the name the errors give it."""


_REPORT_RESERVE = 32 << 20
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _tensors(items: Any) -> list[TensorInfo]:
    return [TensorInfo(str(t["name"]), str(t["dtype"]), tuple(t["shape"])) for t in items or []]


def _from_json(data: dict[str, Any]) -> ModelDescription:
    fields = dict(data)
    for key in ("inputs", "outputs", "weights"):
        fields[key] = _tensors(fields.get(key))
    known = ModelDescription.__dataclass_fields__
    return ModelDescription(**{k: v for k, v in fields.items() if k in known})


def describe_in_child(path: str, reader: str = "hdf5") -> ModelDescription:
    """The description of the local file at ``path`` by ``reader`` (:data:`READERS`), made by a
    memory-capped child."""
    name = READERS[reader]
    # One BLAS thread: OpenBLAS reserves address space per thread when numpy is imported
    # (gigabytes on a many-core node), which would count against the child's cap.
    env = {**os.environ, **dict.fromkeys(_THREAD_VARIABLES, "1")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml.models.formats.isolated", reader, os.fspath(path)],
            capture_output=True, text=True, timeout=TIMEOUT, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ModelFormatError(path, f"describing it took over {TIMEOUT:g} s") from None
    if proc.returncode < 0:
        raise ModelFormatError(
            path, f"the {name} reader crashed on it (signal {-proc.returncode}): not a valid file"
        )
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFormatError(path, f"the {name} reader failed ({tail[:200]})") from None
    if "error" in answer:
        raise ModelFormatError(path, str(answer["error"]))
    return _from_json(answer["description"])


def _child(reader: str, path: str) -> dict[str, Any]:
    import importlib
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MAX_CHILD_MEMORY, MAX_CHILD_MEMORY))
    if reader not in READERS:  # only our own modules, whatever the command line says
        return {"error": f"unknown reader {reader!r}"}
    module = importlib.import_module(f"cvmfs_ml.models.formats.{reader}")
    # Room to report in: a reader that used up the whole cap (the unpickler building millions
    # of objects) leaves none to make even the error's message, and the child died mute.
    reserve: bytearray | None = bytearray(_REPORT_RESERVE)
    try:
        with open(path, "rb") as f:
            description = module.describe_here(f, Source(path, open))
    except MemoryError:
        reserve = None
        return {"error": f"describing it needed over {MAX_CHILD_MEMORY >> 20} MiB of memory"}
    except ModelFormatError as exc:
        reserve = None
        if isinstance(exc.__context__, MemoryError):
            return {"error": f"describing it needed over {MAX_CHILD_MEMORY >> 20} MiB of memory"}
        return {"error": str(exc.reason)}
    del reserve
    return {"description": description.to_json(weights=True)}


if __name__ == "__main__":  # pragma: no cover - run as the child above
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))
