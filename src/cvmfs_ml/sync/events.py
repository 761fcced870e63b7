"""What a sync round did, as DUCC reports it: JSON lines, one object per event.

The keys are DUCC's notification keys where they fit (``ducc/notification/notification.go``):
``action``, ``image``, ``status`` (``ok`` / ``error``), ``error``, ``size_bytes``,
``public_path``, ``private_path``, ``time``, ``pid``. The file is append-only and line-buffered
so several sync processes can write to it and ``logrotate`` can rotate it, as DUCC's.
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
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def emit(self, event: Event) -> Event:
        with self._lock:
            self.events.append(event)
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
