"""Where a read's time goes in this process: the counters behind issue 14's read breakdown.

One :data:`READ_PROFILE` per process (a mount daemon or an fsspec reader serves one repository),
updated by the read path (:mod:`cvmfs_ml.client.files`), the cache (:mod:`.cache`: lookups and
CRC passes) and the FUSE layer (:mod:`.fuse`: time in the read handler on the event loop).
``cvmfs-ml stats MOUNTPOINT`` shows it under ``read_profile`` and the read benchmark prints the
difference across a timed ``cat``. Counting costs two ``perf_counter`` calls per step; nothing
is sampled or logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

__all__ = ["READ_PROFILE", "ReadProfile"]


@dataclass
class ReadProfile:
    """Counts and seconds per step of serving reads (all threads of the process together).

    * ``loop_*``: reads answered on the FUSE event loop from the page cache (``RWF_NOWAIT``);
    * ``thread_*``: reads sent to a worker thread (data not in the page cache, or a piece
      still to be looked up or fetched), and ``nowait_misses`` the subset that tried the loop
      first;
    * ``pread_*``: the ``preadv`` system calls themselves, wherever they ran;
    * ``lookup_*``: finding a piece in the cache (cachedb row, ``stat``, open) on a reader's path;
    * ``crc_*``: full CRC-32 passes over cache files (first lookup of a file not stamped at
      commit, see :mod:`.cache`);
    * ``advise_*``: pieces paged in ahead of a sequential reader (seconds of a background
      thread, mostly waiting for the disk);
    * ``handler_seconds``: time inside the FUSE read handler on the event loop (the loop's
      other time is pyfuse3 replying to the kernel, receiving requests, and idling).
    """

    loop_reads: int = 0
    loop_bytes: int = 0
    loop_seconds: float = 0.0
    thread_reads: int = 0
    thread_bytes: int = 0
    thread_seconds: float = 0.0
    nowait_misses: int = 0
    pread_calls: int = 0
    pread_bytes: int = 0
    pread_seconds: float = 0.0
    lookup_count: int = 0
    lookup_seconds: float = 0.0
    crc_files: int = 0
    crc_bytes: int = 0
    crc_seconds: float = 0.0
    advise_pieces: int = 0
    advise_bytes: int = 0
    advise_seconds: float = 0.0
    handler_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        """Add to counters by name (thread-safe)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    @contextmanager
    def timing(self, prefix: str, count: str, nbytes: int = 0) -> Iterator[None]:
        """Time a block into ``<prefix>_seconds``, adding 1 to ``count`` and ``nbytes`` bytes."""
        started = time.perf_counter()
        try:
            yield
        finally:
            deltas: dict[str, float] = {
                f"{prefix}_seconds": time.perf_counter() - started,
                count: 1,
            }
            if nbytes:
                deltas[f"{prefix}_bytes"] = nbytes
            self.add(**deltas)

    def snapshot(self) -> dict[str, float]:
        """The counters now, seconds rounded to microseconds."""
        with self._lock:
            values = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


READ_PROFILE = ReadProfile()
"""This process's read profile."""
