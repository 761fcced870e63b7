"""Rich progress bars on stderr for slow commands (publish, ``model publish``, gc, replica sync).

Only on a terminal: when stderr is a file or a pipe nothing is drawn, so scripts and logs see
the same one-line summaries as before. The work itself is not instrumented line by line; a
background thread polls counters the library already keeps (files and bytes read so far) five
times a second, which costs nothing measurable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["folder_bytes", "polled_progress", "publish_progress"]

Poll = Callable[[], "tuple[int, int] | None"]


def _terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def polled_progress(
    description: str, total: int | None, poll: Poll, *, unit: str = "files"
) -> Iterator[None]:
    """Show ``(bytes, count) = poll()`` against ``total`` bytes while the block runs."""
    if not _terminal():
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[count]} " + unit),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(description, total=total or None, count=0)
    stop = threading.Event()

    def update() -> None:
        while not stop.wait(0.2):
            state = poll()
            if state is not None:
                progress.update(task, completed=state[0], count=state[1])

    with progress:
        thread = threading.Thread(target=update, name="cvmfs-ml-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)


def folder_bytes(src: Path) -> int | None:
    """Bytes to read for ``src`` (a folder's regular files, or a tarball's size), for the bar."""
    if src.is_file():
        return src.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(src):
        for name in files:
            with contextlib.suppress(OSError):
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    total += os.path.getsize(path)
    return total


def publish_progress(
    publisher: object, src: Path | None, description: str = "publishing"
) -> contextlib.AbstractContextManager[None]:
    """A bar over a publisher's running commit (files and bytes read from ``src``)."""

    def poll() -> tuple[int, int] | None:
        stats = getattr(publisher, "progress", None)
        return None if stats is None else (stats.bytes_in, stats.files)

    total = folder_bytes(src) if (src is not None and _terminal()) else None
    return polled_progress(description, total, poll)
