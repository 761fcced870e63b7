"""Keep a long-running server's heap from growing with its thread count.

glibc gives each thread that allocates its own malloc arena (up to eight per core). The
registry's threads (the event loop, the pre-ingest reader, the pipeline's workers, AnyIO's
pool) each allocate and free multi-MiB buffers, and memory freed into one arena is not reused by
another, so the server's RSS grew with every thread that had once held a block: 306-347 MiB
at the peak of ``benchmarks/bench_registry.py`` (50 CIDs, then five 1 GiB ``oras push``),
against 189 MiB with one arena and no change in speed (push until published 4.4-4.6 s either
way). The issue's bound is 300 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["bound_malloc_arenas"]

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def bound_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX)``); whether it was taken.

    Call it before the process starts threads (arenas made earlier stay). Elsewhere (musl,
    macOS) it does nothing; ``MALLOC_ARENA_MAX`` in the environment does the same.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
