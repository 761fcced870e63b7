"""Layer bytes, decompressed: gzip (ISA-L's inflate where installed), zstd, or as they are.

Layers come from registries and are untrusted, and a layer applied while it downloads is
decoded before its digest is checked (``sync.images``), so a corrupt or cut-off stream must
stop the layer with :class:`~cvmfs_ml.errors.FormatError`, like any other damage, and not with
whatever the decoder raises (``EOFError``, ``zlib.error``, gzip's ``BadGzipFile``, ISA-L's
``IsalError``, ``zstandard.ZstdError``): those are no :class:`~cvmfs_ml.errors.CvmfsMlError`,
and a sync round that lets one through stops every other image of the round with it.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.errors import FormatError

__all__ = ["decompressed", "open_decompressed", "sniff_compression"]

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff_compression(path: Path) -> str:
    """``"gzip"``, ``"zstd"`` or ``"none"`` from the first bytes of ``path``.

    Media types say what a layer should be, but registries hold mislabelled layers (a ``+gzip``
    type on an uncompressed tar, Docker's gzip-only types on zstd), so the bytes decide.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


@contextlib.contextmanager
def open_decompressed(path: Path) -> Iterator[BinaryIO]:
    """A forward-only stream of ``path``'s decompressed bytes (gzip, zstd or as is)."""
    with open(path, "rb") as raw, decompressed(raw, sniff_compression(path)) as stream:
        yield stream


class _Decoded(io.RawIOBase):
    """A decoder's output whose decoding errors are :class:`FormatError` (the raw stream's
    own errors, a network read's say, pass through as they are)."""

    def __init__(self, stream: Any, kind: str, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._stream = stream
        self._kind = kind
        self._errors = errors

    def readable(self) -> bool:
        return True

    def _refuse(self, exc: BaseException) -> FormatError:
        reason = str(exc) or type(exc).__name__
        return FormatError(f"{self._kind} stream", f"corrupt or cut off ({reason})")

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._stream.read(size)
        except self._errors as exc:
            raise self._refuse(exc) from None

    def readinto(self, buffer: Any, /) -> int:
        try:
            return self._stream.readinto(buffer)  # no copy: GzipFile and zstd's reader have it
        except self._errors as exc:
            raise self._refuse(exc) from None


@contextlib.contextmanager
def decompressed(raw: BinaryIO, kind: str | None = None) -> Iterator[BinaryIO]:
    """``raw`` decompressed; ``kind`` (``gzip``, ``zstd``, ``none``) sniffed when not given
    (``raw`` must then be an :class:`io.BufferedReader`, whose ``peek`` does not consume)."""
    if kind is None:
        head = raw.peek(4)[:4]  # type: ignore[attr-defined]
        kind = "gzip" if head.startswith(_GZIP_MAGIC) else "none"
        kind = "zstd" if head.startswith(_ZSTD_MAGIC) else kind
    if kind == "gzip":
        import gzip

        errors: tuple[type[BaseException], ...] = (gzip.BadGzipFile, EOFError, zlib.error)
        try:
            from isal import igzip as gzip_module  # 3-4x faster inflate when present
            from isal.igzip_lib import IsalError

            errors = (*errors, IsalError)
        except ImportError:  # pragma: no cover - isal is an optional accelerator
            gzip_module = gzip  # type: ignore[assignment]
        with gzip_module.GzipFile(fileobj=raw, mode="rb") as stream:
            yield _Decoded(stream, "gzip", errors)  # type: ignore[misc]
    elif kind == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        with reader:
            yield _Decoded(reader, "zstd", (zstandard.ZstdError, EOFError))  # type: ignore[misc]
    else:
        yield raw
