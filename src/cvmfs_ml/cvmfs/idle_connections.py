"""A bound on the SQLite connections catalogs keep open, least recently used closed first.

A connection costs about 110 KiB however small its database (SQLite's lookaside memory and the
parsed schema). Repositories with a nested catalog per model version or image have thousands
of catalogs: walked whole (a mount's ``find``, ``repo check``, ``gc``) the reader held 3000
connections, 460-650 MB, and a publish creating 3000 nested catalogs 600 MB. A catalog whose
connection was closed opens it again on its next query (about 0.1 ms).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

__all__ = ["IdleConnections", "Reconnecting"]


class Reconnecting(Protocol):
    """A catalog that can close its connection while idle and open it again on demand."""

    _lock: threading.Lock | threading.RLock

    def _disconnect(self) -> None:
        """Close the connection (the caller holds ``_lock``)."""


class IdleConnections:
    """The catalogs with an open connection, least recently queried first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._order: OrderedDict[int, Reconnecting] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, catalog: Reconnecting) -> None:
        """``catalog`` (whose lock the caller holds) was used; close the oldest beyond the
        capacity. A catalog busy in another thread is passed over, never waited for: two
        threads each holding one catalog's lock must not wait for the other's."""
        key = id(catalog)
        with self._lock:
            if key in self._order:
                self._order.move_to_end(key)
                return
            self._order[key] = catalog
            if len(self._order) <= self.capacity:
                return
            for old_key, old in list(self._order.items())[:-1]:
                if old._lock.acquire(blocking=False):
                    try:
                        old._disconnect()
                    finally:
                        old._lock.release()
                    del self._order[old_key]
                    if len(self._order) <= self.capacity:
                        return

    def forget(self, catalog: Reconnecting) -> None:
        """``catalog`` closed for good."""
        with self._lock:
            self._order.pop(id(catalog), None)
