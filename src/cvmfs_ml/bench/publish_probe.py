"""Child process of the publish benchmark: ``python -m cvmfs_ml.bench.publish_probe SPEC``.

One publish of ``SPEC["src"]`` at ``SPEC["at"]`` into the repository ``SPEC["repo"]``, in a fresh
interpreter so that its peak RSS and CPU are the publisher's own, not the driver's. Prints one
JSON line after :data:`MARK`: the publish's wall time (transaction start to manifest swap, the
final ``syncfs`` included), its counters, the per-stage breakdown
(:class:`~cvmfs_ml.publish.profile.StageClock`), CPU seconds and ``VmHWM``.

``VmHWM``, not ``ru_maxrss``: Python's subprocess uses ``vfork``, and ``execve`` folds the
parent's high-water mark into the child's ``ru_maxrss``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.read_probe import _peak_rss as _vm_hwm_bytes  # VmHWM of this process

__all__ = ["MARK", "probe_publish", "publish_once", "run_publish_probe"]

MARK = "@@BENCH_PUBLISH@@"


def publish_once(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish in this process and describe it (what the child prints)."""
    from cvmfs_ml.publish.repository import Publisher

    rss_after_import = _vm_hwm_bytes()
    publisher = Publisher.open(Path(spec["repo"]))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with publisher.transaction() as txn:
        txn.add_folder(Path(spec["src"]), spec.get("at", "/"))
        result = txn.commit()
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = result.stats
    return {
        "seconds": seconds,
        "revision": result.revision,
        "files": stats.files,
        "bytes_in": stats.bytes_in,
        "files_unchanged": stats.files_unchanged,
        "objects_new": stats.objects_new,
        "objects_existing": stats.objects_existing,
        "bytes_stored_new": stats.bytes_stored,
        "peak_rss": _vm_hwm_bytes(),
        "peak_rss_after_import": rss_after_import,
        "cpu_user": usage.ru_utime - cpu0.ru_utime,
        "cpu_sys": usage.ru_stime - cpu0.ru_stime,
        "workers": publisher.settings.worker_count,
        "stages": stats.stages.as_dict(),
    }


def probe_publish(spec: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """Run :func:`publish_once` in a fresh interpreter and return its result."""
    cmd = [sys.executable, "-m", __name__, json.dumps(spec)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    wall = time.perf_counter() - t0
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            result: dict[str, Any] = json.loads(line[len(MARK):])
            result["process_wall"] = wall
            return result
    raise RuntimeError(f"publish probe failed ({out.returncode}):\n{out.stderr[-3000:]}")


def run_publish_probe(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m {__name__} SPEC.json", file=sys.stderr)
        return 2
    print(MARK + json.dumps(publish_once(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_publish_probe(sys.argv[1:]))
