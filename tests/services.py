"""Kept for test files written before the services moved to :mod:`cvmfs_ml.testing`.

Tests import ``cvmfs_ml.testing`` directly; this re-export lets branches that still write
``from services import Nginx`` merge. Delete it once nothing does
(``grep -rn "from services import" tests``).
"""

from __future__ import annotations

from cvmfs_ml.testing import *  # noqa: F403  (the re-export is this module's purpose)
from cvmfs_ml.testing import __all__ as __all__
