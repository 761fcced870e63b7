"""Small disks for tests of a full disk: a real tmpfs of a given size (needs root), and a file
that fills what is left of one."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax, e.g. ``4m``) at ``where``; skips without root."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until its file system has at most ``leave`` bytes free."""
    with open(path, "wb") as out:
        with contextlib.suppress(OSError):
            while True:
                fs = os.statvfs(path)
                room = fs.f_bavail * fs.f_frsize - leave
                if room <= 0:
                    break
                out.write(b"\0" * min(room, 1 << 20))
                out.flush()
        with contextlib.suppress(OSError):
            os.fsync(out.fileno())
