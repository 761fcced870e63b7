"""Fixtures of the models tests: a fresh repository with small chunks (the OCI ingest tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import Publisher, create_repository
from repos import SMALL_CHUNKS


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return create_repository(tmp_path / "srv", "models.test", settings=SMALL_CHUNKS)
