"""The registry server caps glibc's malloc arenas (its peak RSS grew with its thread count)."""

from __future__ import annotations

import platform
import sys

import pytest

from cvmfs_ml.registry.heap import bound_malloc_arenas


def test_the_arena_cap_is_taken_on_glibc() -> None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(M_ARENA_MAX) is glibc's")
    assert bound_malloc_arenas(8) is True  # glibc's own default for this machine's cores

