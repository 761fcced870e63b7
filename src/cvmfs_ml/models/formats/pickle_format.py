"""Pickle and joblib files: recognised, never unpickled, always flagged unsafe.

Loading a pickle runs whatever code it names, so a repository can only warn about them. A
protocol-2+ pickle starts with the ``PROTO`` opcode (``0x80``) and its protocol number
(``pickletools``); joblib writes the same stream with numpy arrays spliced in after
``joblib.numpy_pickle.NumpyArrayWrapper`` records, often compressed (zlib by default; gzip, bz2,
xz, lzma, lz4 on request: ``joblib/compressor.py``). We decompress only the first bytes to see the
``PROTO`` opcode, and list the globals the stream would import (a ``pickletools`` opcode walk over
at most :data:`SCAN_BUDGET` bytes) so a reviewer can see what loading it would run.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickletools
import zlib
from typing import Any

from cvmfs_ml.models.formats._unpickle import scan_globals
from cvmfs_ml.models.formats.base import (
    ModelDescription,
    ModelFormatError,
    Probe,
    ReadableFile,
    Source,
    suffix_of,
)
from cvmfs_ml.publish.archive import STREAM_ERRORS

__all__ = ["FORMATS", "SCAN_BUDGET", "describe", "detect"]

FORMATS = ("pickle", "joblib")
#: Decompressed bytes the globals scan may read (the scan stops at the first array payload).
SCAN_BUDGET = 16 << 20
_UNSAFE = "loading runs pickle, which can execute arbitrary code: load only from trusted sources"
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pck", ".joblib"})
_FRAMEWORKS = (
    ("sklearn", "scikit-learn"), ("xgboost", "xgboost"), ("lightgbm", "lightgbm"),
    ("catboost", "catboost"), ("torch", "pytorch"), ("keras", "keras"),
    ("tensorflow", "tensorflow"), ("statsmodels", "statsmodels"),
)  # fmt: skip


def _compression(head: bytes) -> str | None:
    if (
        len(head) >= 2
        and head[0] & 0x0F == 8
        and head[0] >> 4 <= 7
        and ((head[0] << 8 | head[1]) % 31 == 0)
    ):
        return "zlib"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x5d\x00\x00"):
        return "lzma"
    if head.startswith(b"ZF0x"):
        return "joblib-zlib"
    return None


def _decompress_head(kind: str, data: bytes) -> bytes:
    """The first bytes of the decompressed stream (b'' if it does not decompress)."""
    try:
        if kind == "zlib":
            return zlib.decompressobj().decompress(data, 64)
        if kind == "joblib-zlib":
            start = data.find(b"x", 4)
            return zlib.decompressobj().decompress(data[start:], 64) if start > 0 else b""
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data, 64)
        if kind == "bz2":
            return bz2.BZ2Decompressor().decompress(data, 64)
        return lzma.LZMADecompressor().decompress(data, 64)
    except (*STREAM_ERRORS, ValueError):
        return b""


def _is_pickle(head: bytes, suffix: str) -> int | None:
    """The pickle protocol if ``head`` starts a pickle stream, else None."""
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return head[1] if chr(head[2]) in pickletools.code2op else None
    if suffix in _PICKLE_SUFFIXES and head:
        # Protocols 0 and 1 have no header: accept the name only if the opcodes parse.
        try:
            for count, (op, _arg, _pos) in enumerate(pickletools.genops(io.BytesIO(head))):
                if op.name == "STOP" or count >= 8:
                    return 0
        except (ValueError, EOFError, UnicodeDecodeError, IndexError):
            return None
    return None


def detect(probe: Probe) -> str | None:
    """``"pickle"`` or ``"joblib"`` from the PROTO opcode, looking inside joblib compression."""
    head, compression = probe.head, _compression(probe.head)
    if compression is not None:
        head = _decompress_head(compression, probe.head)
        if not head.startswith(b"\x80"):
            return None
    if _is_pickle(head, probe.suffix) is None:
        return None
    if compression is not None or probe.suffix == ".joblib" or b"joblib" in probe.head:
        return "joblib"
    return "pickle"


class _Budget(io.RawIOBase):
    """A reader that stops after ``budget`` bytes, so a scan never reads a whole large file."""

    def __init__(self, f: Any, budget: int) -> None:
        super().__init__()
        self.f = f
        self.left = budget
        self.pos = 0
        self.exhausted = False

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # pickletools.genops reports opcode positions through tell()
        return self.pos

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0 or size > self.left:
            size = self.left
            self.exhausted = True
        data = self.f.read(size)
        self.left -= len(data)
        self.pos += len(data)
        return data

    def readline(self, size: int | None = -1, /) -> bytes:
        out = bytearray()
        while not out.endswith(b"\n"):
            ch = self.read(1)
            if not ch:
                break
            out += ch
        return bytes(out)


def _stream(f: ReadableFile, compression: str | None) -> Any:
    f.seek(0)
    if compression is None:
        return f
    if compression == "gzip":
        return gzip.GzipFile(fileobj=f)  # type: ignore[arg-type]
    if compression == "bz2":
        return bz2.BZ2File(f)  # type: ignore[arg-type]
    if compression in ("xz", "lzma"):
        return lzma.LZMAFile(f)  # type: ignore[arg-type]
    if compression == "joblib-zlib":
        f.seek(f.read(64).find(b"x", 4))
    return _ZlibReader(f)


class _ZlibReader(io.RawIOBase):
    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f
        self.d = zlib.decompressobj()
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        while (size < 0 or len(self.buf) < size) and not self.d.eof:
            chunk = self.f.read(1 << 16)
            if not chunk:
                break
            self.buf += self.d.decompress(chunk)
        if size < 0:
            size = len(self.buf)
        out, self.buf = self.buf[:size], self.buf[size:]
        return out


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Flag the pickle unsafe and list the globals it imports (nothing is unpickled)."""
    f.seek(0)
    raw_head = f.read(4096)
    compression = _compression(raw_head)
    head = _decompress_head(compression, raw_head) if compression else raw_head
    protocol = _is_pickle(head, suffix_of(source.name))
    if protocol is None:
        raise ModelFormatError(source.path, "not a pickle stream (no PROTO opcode)")
    is_joblib = compression is not None or source.name.lower().endswith(".joblib")
    is_joblib = is_joblib or b"joblib" in head or b"joblib" in raw_head
    try:
        budget = _Budget(_stream(f, compression), SCAN_BUDGET)
        found, stopped = scan_globals(budget)
    except STREAM_ERRORS as exc:
        found, stopped = [], f"{type(exc).__name__}: {exc}"
    is_joblib = is_joblib or any(g.startswith("joblib.") for g in found)
    desc = ModelDescription(format="joblib" if is_joblib else "pickle", unsafe=True)
    desc.warnings.append(_UNSAFE)
    desc.metadata = {"protocol": protocol, "compression": compression, "globals": found}
    if stopped and not (is_joblib and "NumpyArrayWrapper" in " ".join(found)):
        desc.metadata["scan_stopped"] = stopped
    for prefix, framework in _FRAMEWORKS:
        if any(g == prefix or g.startswith(prefix + ".") for g in found):
            desc.framework = framework
            break
    return desc
