r"""Moved to :mod:`cvmfs_ml.testing`; this name stays only for branches written before the move.

Nothing in this checkout imports it. Delete it once no merged branch does
(``grep -rn "bench.services\|bench import services" src tests benchmarks``).
"""

from __future__ import annotations

from cvmfs_ml.testing import *  # noqa: F403  (the re-export is this module's purpose)
from cvmfs_ml.testing import __all__ as __all__
