"""Publishing settings the tests share: chunks of 64/128/256 KiB, so that a few hundred
kilobytes make several chunks (files chunked, catalogs with chunk rows) without big inputs."""

from __future__ import annotations

from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish.settings import PublishSettings

__all__ = ["SMALL_CHUNKS"]

SMALL_CHUNKS = PublishSettings(
    compression=Compression.ZLIB,
    min_chunk_size=64 * 1024,
    avg_chunk_size=128 * 1024,
    max_chunk_size=256 * 1024,
    workers=2,
)
