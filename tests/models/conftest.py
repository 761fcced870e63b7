"""Fixtures of the models tests: a fresh repository with small chunks (the OCI ingest tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    settings = PublishSettings(
        compression=Compression.ZLIB,
        min_chunk_size=64 * 1024,
        avg_chunk_size=128 * 1024,
        max_chunk_size=256 * 1024,
        workers=2,
    )
    return create_repository(tmp_path / "srv", "models.test", settings=settings)
