"""Whether real FUSE mounts can run here (shared by the test folders that mount)."""

from __future__ import annotations

import os
import shutil


def fuse_problem() -> str | None:
    """Why FUSE mounts cannot run on this machine, or None when they can."""
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3/trio not importable: {exc}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse is not usable: {exc.strerror}"
    return None
