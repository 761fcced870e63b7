"""Real services (nginx, Squid, docker-registry) on loopback, for integration tests.

The implementation is :mod:`cvmfs_ml.bench.services`, shared with the benchmark harness (the
installed package cannot import tests, so the code lives there); this module re-exports every
name in its ``__all__`` so tests keep writing ``from services import Nginx, Squid, ...``
(``tests/`` is on ``sys.path``). It does not import pytest; the fixtures live in
``tests/conftest.py``.
"""

from __future__ import annotations

from cvmfs_ml.bench.services import *  # noqa: F403  (the re-export is this module's purpose)
from cvmfs_ml.bench.services import __all__ as __all__
