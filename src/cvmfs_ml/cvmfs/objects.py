"""Content-addressed objects: names, suffixes and the compression codec (§0.1, §1, §6).

An object's name is the hash of the bytes stored on the server: the zlib stream when the object
is compressed, the raw bytes when it is not. Catalogs, history, certificate and meta-info are
always zlib; file data and chunks follow the repository's compression setting.

The codecs here are streaming (``compress(piece)`` / ``flush()``) so that a multi-GB file never
sits in memory at once.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, new_hasher
from cvmfs_ml.errors import FormatError, IntegrityError

__all__ = [
    "ObjectKind",
    "Compression",
    "object_path",
    "parse_object_path",
    "Compressor",
    "new_compressor",
    "Decompressor",
    "inflate",
    "deflate",
    "verify",
    "digest_of",
    "inflate_stream",
]


class ObjectKind(enum.Enum):
    """The one-letter suffix of an object name (§0.1)."""

    FILE = ""
    CATALOG = "C"
    PARTIAL = "P"
    HISTORY = "H"
    CERTIFICATE = "X"
    METAINFO = "M"


class Compression(enum.Enum):
    """How file data is stored.

    ``ZLIB`` is upstream's default and byte-identical to it; ``NONE`` stores raw bytes (catalog
    flag ``0x800``); ``FAST_ZLIB`` writes a valid zlib stream with ISA-L (every reader inflates it,
    but object names differ from upstream's); ``AUTO`` is a publisher policy, not a wire format:
    it resolves per file to ``ZLIB`` or ``NONE``.
    """

    ZLIB = "zlib"
    NONE = "none"
    FAST_ZLIB = "isal"
    AUTO = "auto"

    @property
    def is_compressed(self) -> bool:
        return self in (Compression.ZLIB, Compression.FAST_ZLIB)


def object_path(digest: Digest, kind: ObjectKind = ObjectKind.FILE) -> str:
    """``data/ab/cdef...[-algo][suffix]`` relative to the repository root (MakePath)."""
    text = digest.hex
    return f"data/{text[:2]}/{text[2:]}{kind.value}"


def parse_object_path(path: str) -> tuple[Digest, ObjectKind]:
    """Inverse of :func:`object_path` (accepts the path with or without the ``data/`` prefix)."""
    rel = path.removeprefix("data/")
    head, sep, tail = rel.partition("/")
    if not sep or len(head) != 2:
        raise FormatError("object path", f"{path!r} is not data/xx/...")
    text = head + tail
    kind = ObjectKind.FILE
    if text and text[-1] in "CPHXM":
        kind = ObjectKind(text[-1])
        text = text[:-1]
    return Digest.from_hex(text), kind


class Compressor(Protocol):
    """A streaming encoder: feed pieces, then flush once."""

    def compress(self, data: bytes | memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes | memoryview, /) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


def new_compressor(compression: Compression) -> Compressor:
    """A fresh encoder for one object (each object or chunk is one independent stream)."""
    if compression is Compression.ZLIB:
        # Z_DEFAULT_COMPRESSION with default window and memory level, as upstream (§6).
        return zlib.compressobj(6)
    if compression is Compression.NONE:
        return _Identity()
    if compression is Compression.FAST_ZLIB:
        try:
            from isal import isal_zlib
        except ImportError as exc:
            raise FormatError(
                "compression", "'isal' needs the isal package: pip install isal"
            ) from exc
        return isal_zlib.compressobj(1)
    raise FormatError("compression", f"{compression.value!r} is a policy, not an object codec")


class Decompressor:
    """A streaming zlib decoder that refuses trailing garbage and truncated streams.

    ``max_output`` bounds the inflated size: a few kilobytes of zlib can inflate a thousandfold
    (a zlib bomb), so the decoder never produces more than one byte past the bound before it
    raises :class:`~cvmfs_ml.errors.FormatError`. :meth:`pieces` yields the output of one input
    block in pieces of at most :attr:`piece_size` bytes, so memory stays bounded too.
    """

    piece_size = 4 * 2**20

    def __init__(self, what: str = "object", *, max_output: int | None = None) -> None:
        self._what = what
        self._inflater = zlib.decompressobj()
        self._limit = max_output
        self.produced = 0

    def pieces(self, data: bytes | memoryview) -> Iterator[bytes]:
        """Inflate ``data``; yields outputs of at most :attr:`piece_size` bytes."""
        pending: bytes | memoryview = data
        while True:
            budget = self.piece_size
            if self._limit is not None:
                budget = min(budget, self._limit - self.produced + 1)
            try:
                out = self._inflater.decompress(pending, budget)
            except zlib.error as exc:
                raise FormatError(self._what, f"corrupt zlib stream: {exc}") from exc
            self._account(out)
            if out:
                yield out
            pending = self._inflater.unconsumed_tail
            if not pending:
                break
        if self._inflater.unused_data:
            raise FormatError(self._what, "data after the end of the zlib stream")

    def decompress(self, data: bytes | memoryview) -> bytes:
        parts = list(self.pieces(data))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def flush(self) -> bytes:
        try:
            out = self._inflater.flush()
        except zlib.error as exc:
            raise FormatError(self._what, f"corrupt zlib stream: {exc}") from exc
        if not self._inflater.eof:
            raise FormatError(self._what, "truncated zlib stream")
        self._account(out)
        return out

    def _account(self, out: bytes) -> None:
        self.produced += len(out)
        if self._limit is not None and self.produced > self._limit:
            raise FormatError(self._what, f"inflates to more than {self._limit} bytes")


MAX_UNSIZED_OBJECT = 2 * 2**30
"""Content bound for objects no catalog gives a size for (a root catalog, history, meta-info)."""


def stored_bound(size: int, compressed: bool) -> int:
    """The most bytes an object of ``size`` content bytes can take as stored.

    zlib's worst case (incompressible data in stored blocks) adds 5 bytes per 16 KiB block plus
    a header and trailer; 1/256 plus 4 KiB is safely above it for any encoder settings.
    """
    return size + size // 256 + 4096 if compressed else size


def deflate(data: bytes | memoryview, compression: Compression = Compression.ZLIB) -> bytes:
    """Encode one whole object."""
    compressor = new_compressor(compression)
    return compressor.compress(data) + compressor.flush()


def inflate(data: bytes | memoryview, what: str = "object") -> bytes:
    """Decode one whole zlib object, refusing truncation and trailing bytes."""
    decompressor = Decompressor(what)
    return decompressor.decompress(data) + decompressor.flush()


def inflate_stream(pieces: Iterable[bytes], what: str = "object") -> Iterator[bytes]:
    """Decode a zlib object that arrives in pieces."""
    decompressor = Decompressor(what)
    for piece in pieces:
        out = decompressor.decompress(piece)
        if out:
            yield out
    tail = decompressor.flush()
    if tail:
        yield tail


def verify(stored: bytes | memoryview, expected: Digest, what: str = "object") -> None:
    """Check that ``stored`` (the bytes as on the server) hashes to ``expected``."""
    hasher = new_hasher(expected.algorithm)
    hasher.update(stored)
    got = Digest(expected.algorithm, hasher.digest())
    if got != expected:
        raise IntegrityError(what, expected.hex, got.hex)


def digest_of(stored: bytes | memoryview, algorithm: Algorithm = Algorithm.SHA1) -> Digest:
    """The name of an object whose stored bytes are ``stored``."""
    hasher = new_hasher(algorithm)
    hasher.update(stored)
    return Digest(algorithm, hasher.digest())
