"""Fixtures of the sync tests: a fresh repository with small chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import Publisher, create_repository
from repos import SMALL_CHUNKS
from sync.imagebuild import FQRN


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return create_repository(tmp_path / "srv", FQRN, settings=SMALL_CHUNKS)
