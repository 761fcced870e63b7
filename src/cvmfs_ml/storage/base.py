"""What the publisher, garbage collection, ``repo check`` and replicas need from a Stratum 0 store.

Two stores implement :class:`ObjectStore`: :class:`~cvmfs_ml.storage.local.LocalStore` (a folder
any web server serves) and :class:`~cvmfs_ml.storage.s3.S3Store` (a bucket whose plain HTTP URL
clients read, as upstream's ``CVMFS_UPSTREAM_STORAGE=S3`` Stratum 0s are run). Paths are relative
to the repository (``.cvmfspublished``, ``data/ab/cdef...C``).

The rules every store keeps, which make a killed publisher harmless:

* a write is all or nothing: readers see the old bytes or the new ones, never a part;
* :meth:`ObjectStore.flush` returns only once everything written so far is durable, and the
  publisher calls it before it swaps the manifest, so a manifest never names a lost object;
* :meth:`ObjectStore.swap_bytes` is a compare-and-swap: the manifest is replaced only if it
  still holds the bytes the transaction started from, so a publisher that lost a race fails
  instead of silently dropping the winner's revision.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, new_hasher
from cvmfs_ml.cvmfs.objects import Decompressor
from cvmfs_ml.errors import FormatError, IntegrityError

__all__ = [
    "ObjectSink",
    "ObjectSource",
    "ObjectStore",
    "copy_verified",
    "decode_verified",
    "is_s3_location",
    "open_store",
]


class ObjectSink(Protocol):
    """One object's stored bytes, written piecewise, then committed under a name or dropped."""

    size: int

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self, rel_path: str) -> bool:
        """Store under ``rel_path``; False when the store already had it (nothing written)."""
        ...

    def discard(self) -> None: ...


@runtime_checkable
class ObjectSource(Protocol):
    """Where a reader gets verified objects: a store, the HTTP fetcher, an external server.

    ``expected`` is checked while the object streams, ``compressed`` objects are inflated,
    and content beyond ``max_bytes`` is refused before it is written (a zlib bomb, an
    oversized object). ``nocache`` asks proxies for a fresh copy where there are any.
    """

    def fetch(
        self,
        rel_path: str,
        expected: Digest | None,
        *,
        compressed: bool,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> bytes: ...

    def fetch_into(
        self,
        rel_path: str,
        expected: Digest | None,
        compressed: bool,
        fileobj: BinaryIO,
        *,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> int: ...


class ObjectStore(ObjectSource, Protocol):
    """A repository's files: content-addressed objects and a few mutable root files."""

    @property
    def location(self) -> str:
        """How users name it: a folder path or ``s3://bucket[/prefix]/fqrn``."""
        ...

    # -- local state of the publisher ---------------------------------------------------------
    def staging_dir(self) -> Path:
        """A local folder for a transaction's scratch files (catalogs being edited...)."""
        ...

    def lock_path(self) -> Path:
        """The file whose ``flock`` serialises publishers of this repository on this machine."""
        ...

    def create_skeleton(self) -> None: ...

    def clean_staging(self) -> int:
        """Remove what killed publishers left in the staging area; returns how many."""
        ...

    # -- writing ------------------------------------------------------------------------------
    def exists(self, rel_path: str) -> bool: ...

    def put_bytes(self, rel_path: str, data: bytes, *, durable: bool = False) -> None: ...

    def put_parts(
        self, rel_path: str, parts: Sequence[bytes | memoryview], *, durable: bool = False
    ) -> None: ...

    def put_object(self, stored: bytes, kind: object, algorithm: Algorithm) -> Digest: ...

    def object_writer(self) -> ObjectSink: ...

    def put_file(self, rel_path: str, source: Path) -> None:
        """Store a local file (in :meth:`staging_dir`) under ``rel_path``; the file is consumed."""
        ...

    def link(self, rel_path: str, target_rel: str) -> None:
        """``rel_path`` answers with the bytes of ``target_rel`` (a symlink, or a server copy)."""
        ...

    def swap_bytes(self, rel_path: str, data: bytes, expected: bytes | None) -> None:
        """Replace ``rel_path`` with ``data`` if it holds ``expected`` (None: must not exist).

        Raises :class:`~cvmfs_ml.errors.PublishError` when it holds something else.
        """
        ...

    def flush(self) -> None:
        """Make every object written so far durable (fsync, or the service's acknowledgement)."""
        ...

    def remove(self, rel_path: str) -> bool: ...

    def remove_many(self, rel_paths: Sequence[str]) -> int:
        """Delete objects (batched where the store can); returns how many were deleted."""
        ...

    # -- reading ------------------------------------------------------------------------------
    def get_bytes(self, rel_path: str) -> bytes: ...

    def list_sizes(self) -> Iterator[tuple[str, int]]:
        """Every object path (``data/xx/...``) with its stored size, staging excluded."""
        ...



def is_s3_location(location: object) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def open_store(location: str | Path, s3_config: Mapping[str, str] | None = None) -> ObjectStore:
    """The store behind a repository location: ``s3://bucket[/prefix]/fqrn`` or a folder.

    ``s3_config`` holds upstream's ``CVMFS_S3_*`` parameters (default: the environment).
    """
    if is_s3_location(location):
        from cvmfs_ml.storage.s3 import S3Store
        from cvmfs_ml.storage.s3_config import S3Config

        return S3Store(str(location), S3Config.from_params(s3_config))
    from cvmfs_ml.storage.local import LocalStore

    return LocalStore(Path(location))


def decode_verified(
    stored: bytes,
    rel_path: str,
    expected: Digest | None,
    compressed: bool,
    max_bytes: int | None = None,
) -> bytes:
    """An object's content: its hash checked when ``expected`` is given, inflated if compressed.

    ``max_bytes`` bounds the inflated content (a zlib bomb stops one byte past it).
    """
    if expected is not None:
        hasher = new_hasher(expected.algorithm)
        hasher.update(stored)
        got = Digest(expected.algorithm, hasher.digest())
        if got != expected:
            raise IntegrityError(rel_path, expected.hex, got.hex)
    if not compressed:
        if max_bytes is not None and len(stored) > max_bytes:
            raise FormatError(rel_path, f"larger than {max_bytes} bytes")
        return stored
    decompressor = Decompressor(rel_path, max_output=max_bytes)
    return decompressor.decompress(stored) + decompressor.flush()


def copy_verified(
    blocks: Iterable[bytes],
    rel_path: str,
    expected: Digest | None,
    compressed: bool,
    fileobj: BinaryIO,
    max_bytes: int | None = None,
) -> int:
    """Stream an object's stored ``blocks`` into ``fileobj`` (checked, inflated); bytes written.

    ``max_bytes`` bounds what is written (inflated content): beyond it is a FormatError, and
    memory stays bounded (inflated output comes in pieces of at most 4 MiB).
    """
    hasher = new_hasher(expected.algorithm) if expected is not None else None
    decompressor = Decompressor(rel_path, max_output=max_bytes) if compressed else None
    written = 0
    inflate_error: FormatError | None = None
    for block in blocks:
        if hasher is not None:
            hasher.update(block)
        if inflate_error is not None:
            continue  # keep hashing: a hash mismatch is the more precise diagnosis
        try:
            for out in decompressor.pieces(block) if decompressor else (block,):
                if max_bytes is not None and written + len(out) > max_bytes:
                    raise FormatError(rel_path, f"larger than {max_bytes} bytes")
                fileobj.write(out)
                written += len(out)
        except FormatError as exc:
            inflate_error = exc
            continue
    if hasher is not None and expected is not None:
        got = Digest(expected.algorithm, hasher.digest())
        if got != expected:
            raise IntegrityError(rel_path, expected.hex, got.hex)
    if inflate_error is not None:
        raise inflate_error
    if decompressor is not None:
        tail = decompressor.flush()
        if max_bytes is not None and written + len(tail) > max_bytes:
            raise FormatError(rel_path, f"larger than {max_bytes} bytes")
        fileobj.write(tail)
        written += len(tail)
    return written
