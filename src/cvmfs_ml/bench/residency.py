"""Which pages of a file are in the page cache: ``mincore(2)`` through ctypes.

The benchmarks use this to show *what a loader actually touched* (onnxruntime faults in
external-data tensors lazily, performance-notes.md §7) and to check that a cold run really
started cold. Mapping a file with ``mmap`` does not read it; ``mincore`` then reports, page by
page, whether the kernel holds the page - for any file system, FUSE mounts included.

Since Linux 5.0 the kernel answers only for files the caller owns or may write (root may do
both); for other files it reports just the pages this process has mapped itself, so the map
reads as "not resident". Run residency checks as the file's owner or as root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "PAGE_SIZE",
    "drops_written_pages",
    "resident_fraction",
    "residency_map",
    "residency_maps",
]

PAGE_SIZE = mmap.PAGESIZE
_WINDOW = 1 << 30  # map at most 1 GiB at a time: bounded address space for huge files

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def residency_map(path: str | os.PathLike[str]) -> np.ndarray:
    """One bool per page of ``path``: True if the page is in the page cache right now."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = -(-size // PAGE_SIZE)
        out = np.zeros(pages, dtype=np.uint8)
        for start in range(0, size, _WINDOW):
            length = min(_WINDOW, size - start)
            addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
            if addr in (None, _MAP_FAILED):
                _check(-1, "mmap", path)
            try:
                first = start // PAGE_SIZE
                vec = out[first: first + -(-length // PAGE_SIZE)]
                _check(_libc.mincore(addr, length, vec.ctypes.data), "mincore", path)
            finally:
                _libc.munmap(addr, length)
    finally:
        os.close(fd)
    return (out & 1).astype(bool)


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of the pages of ``path`` held in the page cache (1.0 for an empty file)."""
    m = residency_map(path)
    return float(m.mean()) if m.size else 1.0


def residency_maps(
    paths: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]],
) -> dict[str, np.ndarray]:
    """Residency of several files, keyed by label (or by path when given a list)."""
    items = paths.items() if isinstance(paths, Mapping) else ((str(p), p) for p in paths)
    return {label: residency_map(p) for label, p in items}


def drops_written_pages(folder: str | os.PathLike[str]) -> bool:
    """Whether files in ``folder`` leave the page cache when asked (tmpfs keeps them): checks
    that say "not resident" mean something only where this is true."""
    from cvmfs_ml.storage.pagecache import drop_cached_pages

    probe = os.path.join(folder, f".drop-probe-{os.getpid()}")
    with open(probe, "wb") as out:
        out.write(os.urandom(1 << 20))
    try:
        return drop_cached_pages(probe) and resident_fraction(probe) == 0.0
    finally:
        os.unlink(probe)
