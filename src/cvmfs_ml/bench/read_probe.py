"""Child processes of the read benchmark: ``python -m cvmfs_ml.bench.read_probe KIND SPEC``.

Each measurement runs in a fresh process (peak RSS never falls within one, and imports must not
be counted twice) and prints one JSON line after :data:`MARK`:

* ``fsspec``: boot a :class:`~cvmfs_ml.client.fsspec.CvmfsFileSystem`, then read the whole file
  into a reused 8 MiB buffer (``read_s`` excludes the boot, reported as ``boot_s``);
* ``ort``: ``onnxruntime.InferenceSession`` (default options) and its first run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["MARK", "probe", "run_probe"]

MARK = "@@BENCH_READ@@"


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _fsspec(args: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from cvmfs_ml.client.fsspec import CvmfsFileSystem
    from cvmfs_ml.client.readprofile import READ_PROFILE

    fs = CvmfsFileSystem(url=args["url"], public_key=args["key"], cache=args["cache"])
    repo = fs.repository()
    t1 = time.perf_counter()
    profile0 = READ_PROFILE.snapshot()
    view = memoryview(bytearray(8 << 20))
    total = 0
    with fs.open(args["path"], "rb") as f:
        while n := f.readinto(view):
            total += n
    t2 = time.perf_counter()
    profile = {k: round(v - profile0[k], 6) for k, v in READ_PROFILE.snapshot().items()}
    cpu = os.times()
    stats = getattr(repo.source, "stats", None)
    return {"boot_s": t1 - t0, "read_s": t2 - t1, "bytes": total, "peak_rss": _peak_rss(),
            "requests": getattr(stats, "requests", None), "cpu_s": cpu.user + cpu.system,
            "fetch_cpu_s": {phase: round(getattr(stats, f"{phase}_cpu_s", 0.0), 3)
                            for phase in ("receive", "hash", "store")},
            "read_profile": profile}


def _ort(args: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    sess = ort.InferenceSession(args["model"], providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (1 if n == 0 else 8) for n, d in enumerate(i.shape)]
        dtype = np.float16 if "float16" in i.type else np.float32
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    sess.run(None, feeds)
    t2 = time.perf_counter()
    return {"create_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0, "peak_rss": _peak_rss()}


_KINDS = {"fsspec": _fsspec, "ort": _ort}


def probe(kind: str, spec: dict[str, Any], env: dict[str, str] | None = None,
          timeout: float = 3600.0) -> dict[str, Any]:
    """Run one probe in a fresh interpreter and return its result."""
    out = subprocess.run([sys.executable, "-m", __name__, kind, json.dumps(spec)],
                         capture_output=True, text=True, check=False, env=env, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{kind} probe failed ({out.returncode}):\n{out.stderr[-3000:]}")


def run_probe(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in _KINDS:
        print(f"usage: python -m {__name__} {{{','.join(_KINDS)}}} SPEC.json", file=sys.stderr)
        return 2
    print(MARK + json.dumps(_KINDS[argv[0]](json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_probe(sys.argv[1:]))
