"""One object from a stream of blocks: compressed, hashed and written as it is read.

Used for a large file stored whole (chunking off) and for catalogs, so that neither is held in
memory: a catalog of 10^6 entries is about 200 MB, and reading it whole to compress it held it
and its compressed copy at once. zlib's output does not depend on how its input is split, so
the object is the one :func:`~cvmfs_ml.cvmfs.objects.deflate` makes of the whole.
"""

from __future__ import annotations

from collections.abc import Iterable

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, new_hasher
from cvmfs_ml.cvmfs.objects import Compression, ObjectKind, new_compressor, object_path
from cvmfs_ml.publish.profile import StageClock
from cvmfs_ml.storage.base import ObjectStore

__all__ = ["stream_object"]


def stream_object(
    store: ObjectStore,
    blocks: Iterable[bytes | memoryview],
    compression: Compression,
    algorithm: Algorithm,
    kind: ObjectKind,
    stages: StageClock,
) -> tuple[Digest, bool, int, int]:
    """Store a stream as one object with one codec, holding a block at a time.

    Returns the digest, whether the store lacked it, the bytes read and the bytes stored.
    """
    compressor = new_compressor(compression)
    hasher = new_hasher(algorithm)
    writer = store.object_writer()
    total = 0
    try:
        for block in blocks:
            total += len(block)
            with stages.measure("compress", len(block)):
                out = compressor.compress(block)
            with stages.measure("hash", len(out)):
                hasher.update(out)
            with stages.measure("write", len(out)):
                writer.write(out)
        tail = compressor.flush()
        hasher.update(tail)
        writer.write(tail)
        digest = Digest(algorithm, hasher.digest())
        with stages.measure("write"):
            new = writer.commit(object_path(digest, kind))
    except BaseException:
        writer.discard()
        raise
    return digest, new, total, writer.size
