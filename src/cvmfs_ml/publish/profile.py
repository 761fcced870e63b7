"""Where a publish spends its time: wall and CPU seconds per stage, summed over threads.

Every publish keeps these counters (issue 14 item 1); they cost two clock reads per measured
call, and the calls are per block (megabytes) or per commit step, so they are always on. The
benchmark prints them per byte (``benchmarks/bench_publish.py``).

Wall time of a stage also counts waiting for the disk, the CPU or the GIL; CPU time
(``CLOCK_THREAD_CPUTIME_ID`` of the measuring thread) is what the stage itself costs, which is
the figure that carries over from a busy machine to a quiet one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["STAGES", "StageTotals", "StageClock"]

STAGES: dict[str, str] = {
    "read": "reading input files (readinto of pool blocks)",
    "wait_buffers": "reader waiting for a free block (the workers are behind)",
    "chunk": "finding chunk boundaries (content-defined chunker)",
    "hash": "content hash of stored bytes (SHA-1 by default)",
    "compress": "zlib / ISA-L compression, auto's trial compression",
    "write": "writing objects into the store (exists check, write, rename)",
    "wait_workers": "reader waiting for files being stored (too many held, or at the end)",
    "catalog": "catalog rows and the catalog databases (SQLite, compress, store)",
    "history": "the tag database of the new revision",
    "fsync": "making objects and catalogs durable before the manifest names them",
    "sign_swap": "reflog, manifest signature and the manifest swap (durable)",
}
"""The stages measured, in pipeline order, with what each covers."""


@dataclass
class StageTotals:
    wall: float = 0.0
    cpu: float = 0.0
    calls: int = 0
    bytes: int = 0


class StageClock:
    """Thread-safe totals per stage name (see :data:`STAGES`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, StageTotals] = {}

    def add(self, stage: str, wall: float, cpu: float, nbytes: int = 0) -> None:
        with self._lock:
            totals = self._totals.get(stage)
            if totals is None:
                totals = self._totals[stage] = StageTotals()
            totals.wall += wall
            totals.cpu += cpu
            totals.calls += 1
            totals.bytes += nbytes

    @contextlib.contextmanager
    def measure(self, stage: str, nbytes: int = 0) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - wall0, time.thread_time() - cpu0, nbytes)

    def totals(self) -> dict[str, StageTotals]:
        """A copy, known stages first in pipeline order."""
        with self._lock:
            names = [s for s in STAGES if s in self._totals]
            names += sorted(set(self._totals) - set(STAGES))
            return {n: StageTotals(**vars(self._totals[n])) for n in names}

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {"wall": round(t.wall, 4), "cpu": round(t.cpu, 4), "calls": t.calls,
                   "bytes": t.bytes}
            for name, t in self.totals().items()
        }
