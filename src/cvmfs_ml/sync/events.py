"""What a sync round did, as DUCC reports it: JSON lines, one object per event.

The keys are DUCC's notification keys where they fit (``ducc/notification/notification.go``):
``action``, ``image``, ``status`` (``ok`` / ``error``), ``error``, ``size_bytes``,
``public_path``, ``private_path``, ``time``, ``pid``. The file is append-only and line-buffered
so several sync processes can write to it, as DUCC's. ``logrotate`` can rotate it with or
without ``copytruncate``: before each event the path is checked, and when it no longer names
the file open (renamed away, with or without a new one created), it is opened again, as
:class:`logging.handlers.WatchedFileHandler` does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Event", "EventLog"]


@dataclass
class Event:
    action: str
    image: str = ""
    status: str = "ok"
    error: str = ""
    size_bytes: int | None = None
    public_path: str = ""
    private_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "status": self.status}
        for key in ("image", "error", "public_path", "private_path"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        out.update(self.extra)
        return out


MAX_KEPT_EVENTS = 10_000


class EventLog:
    """Collects events; appends each to ``path`` (if any) as it happens.

    The latest ``max_kept`` stay in memory for callers to look at (the file has them all): a
    ``sync --loop`` service logs for months, and every event it ever emitted used to stay.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        echo: Callable[[Event], None] | None = None,
        max_kept: int = MAX_KEPT_EVENTS,
    ) -> None:
        self.path = Path(path) if path else None
        self.events: deque[Event] = deque(maxlen=max_kept)
        self._echo = echo
        self._lock = threading.Lock()
        self._handle: TextIO | None = None
        self._opened: tuple[int, int] | None = None  # (device, inode) of the file open
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self._open(self.path)

    def _open(self, path: Path) -> TextIO:
        handle = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        st = os.fstat(handle.fileno())
        self._opened = (st.st_dev, st.st_ino)
        return handle

    def _follow_rotation(self) -> None:
        """Open the path again if it no longer names the file open (rotated away)."""
        if self.path is None or self._handle is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._opened:
                return
        except FileNotFoundError:
            pass  # renamed and not created again: make it
        except OSError:
            return
        try:
            handle = self._open(self.path)
        except OSError:
            return  # go on in the file open (the rotated one) rather than lose the event
        self._handle.close()
        self._handle = handle

    def emit(self, event: Event) -> Event:
        with self._lock:
            self.events.append(event)
            self._follow_rotation()
            if self._handle is not None:
                line = {
                    **event.to_json(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "pid": os.getpid(),
                }
                self._handle.write(json.dumps(line, sort_keys=True) + "\n")
        if self._echo is not None:
            self._echo(event)
        return event

    def __call__(self, action: str, **fields: Any) -> Event:
        extra = {k: fields.pop(k) for k in list(fields) if k not in Event.__dataclass_fields__}
        return self.emit(Event(action, extra=extra, **fields))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
