"""Small per-process thread pools for background work of the read path.

The read path hands work off its callers' threads (the FUSE event loop, a reader's thread):
disk read-ahead advice and drop-behind (:mod:`.files`), page-cache pushes of pieces fetched
before their open registered (:mod:`.page_push`). Each kind gets a small pool of its own, made
on first use and made again in a forked child, whose copy of the parent's pool has no threads
to run what it is given.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["BackgroundPool"]


class BackgroundPool:
    """A lazily made ``ThreadPoolExecutor`` of ``workers`` threads named ``name``."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def get(self) -> ThreadPoolExecutor:
        """This process's pool (a fresh one after a fork)."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
                self._pid = os.getpid()
            return self._pool
