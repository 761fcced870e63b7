"""What open upload sessions hold: who opened each (``max_upload_sessions`` a token) and the
bytes each holds on the disk, all together (``max_session_bytes``).

Why the bytes: the per-token bounds alone left tokens x ``max_upload_sessions`` x
``max_upload_bytes`` as the only bound on unfinished uploads, so enough tokens (or one token
with patience) could fill the disk, and the 507 of a full disk was the only answer. A body is
counted before it is written: its declared length when it has one, else as it arrives.

The ledger is rebuilt from the uploads folder at startup: the owner files beside the sessions
and the sessions' sizes. A session without an owner file (opened before owners were kept)
counts against nobody until a token writes to it, which then owns it (its owner file is
written); its bytes count at once, and untouched it is pruned as abandoned like any other.
"""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path

__all__ = ["SessionLedger"]

SESSION_RE = re.compile(r"[0-9a-f]{32}")


class SessionLedger:
    def __init__(self, uploads: Path) -> None:
        self.uploads = uploads
        self._lock = threading.Lock()
        self._owners: dict[str, str] = {}  # session -> the principal that opened it
        self._bytes: dict[str, int] = {}  # session -> bytes counted (on disk, or about to be)
        self.total = 0
        for path in uploads.iterdir():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if SESSION_RE.fullmatch(path.name):
                    self._count(path.name, path.stat().st_size)
                elif path.suffix == ".owner":
                    self._owners[path.stem] = path.read_text()

    def _count(self, upload_id: str, size: int) -> None:
        self.total += size - self._bytes.get(upload_id, 0)
        self._bytes[upload_id] = size

    def _drop_missing(self) -> None:
        """Sessions whose file is gone (the folder removed under the registry) stop counting."""
        for upload_id in [k for k in self._bytes if not (self.uploads / k).is_file()]:
            self.total -= self._bytes.pop(upload_id)
            self._owners.pop(upload_id, None)

    def _held_by(self, owner: str) -> int:
        return sum(1 for who in self._owners.values() if who == owner)

    def open(self, upload_id: str, owner: str, limit: int) -> int | None:
        """Count the new session as ``owner``'s; when ``owner`` holds ``limit`` already, it is
        not counted and how many it holds is returned."""
        with self._lock:
            if self._held_by(owner) >= limit:  # counted again from the disk first
                self._drop_missing()
                if (held := self._held_by(owner)) >= limit:
                    return held
            self._owners[upload_id] = owner
            self._count(upload_id, 0)
        return None

    def adopt(self, upload_id: str, owner: str) -> None:
        """A session nobody owns (opened before owners were kept) becomes the one of the
        token writing to it: it counts toward that token's sessions from now on."""
        with self._lock:
            if upload_id in self._owners or upload_id not in self._bytes:
                return
            self._owners[upload_id] = owner
        (self.uploads / f"{upload_id}.owner").write_text(owner)

    def reserve(self, upload_id: str, size: int, budget: int | None) -> int | None:
        """Count ``size`` bytes for the session (never less than counted); when that would
        take all sessions past ``budget``, nothing changes and their total is returned."""
        with self._lock:
            counted = self._bytes.get(upload_id, 0)
            if size <= counted:
                return None
            if budget is not None and self.total + size - counted > budget:
                self._drop_missing()
                counted = self._bytes.get(upload_id, 0)
                if self.total + size - counted > budget:
                    return self.total
            self._count(upload_id, size)
        return None

    def settle(self, upload_id: str, size: int) -> None:
        """The session holds ``size`` bytes now (a request ended): what was counted ahead for
        a body that did not all arrive is given back."""
        with self._lock:
            if upload_id in self._bytes:  # not cancelled meanwhile
                self._count(upload_id, size)

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self.total -= self._bytes.pop(upload_id, 0)
            self._owners.pop(upload_id, None)
