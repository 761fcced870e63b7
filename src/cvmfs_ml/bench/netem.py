r"""Moved to :mod:`cvmfs_ml.testing.netem`; this name stays for code written before the move.

``bench/readbench.py`` (kept by another branch) still imports ``DelayProxy`` from here. Delete
this module once nothing does (``grep -rn "bench.netem\|bench import netem" src tests
benchmarks``).
"""

from __future__ import annotations

from cvmfs_ml.testing.netem import *  # noqa: F403  (the re-export is this module's purpose)
from cvmfs_ml.testing.netem import __all__ as __all__
