"""What every format module shares: the description value, the error, and header-only I/O.

A model file may be 10 GB and may sit in a remote repository, so every parser here reads through
:class:`ReadableFile` (anything with ``read``/``seek``/``tell``: ``open(path, "rb")``, an fsspec
file, a CVMFS client file) and only ever reads headers: small, bounded reads at known offsets.
:class:`BlockReader` caches those reads in blocks so that parsers that hop around (protobuf,
FlatBuffers, zip directories) cost a few range requests, not one per field.
"""

from __future__ import annotations

import io
import os
import posixpath
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

from cvmfs_ml.errors import FormatError

ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
    zlib.error,
)  # fmt: skip
"""What :mod:`zipfile` raises on a damaged or hostile archive: an unsupported "version
needed" or compression (``NotImplementedError``), an encrypted member (``RuntimeError``), a
corrupt deflate stream (``zlib.error``), offsets past the end (``ValueError``, ``OSError``),
besides ``BadZipFile``."""

__all__ = [
    "HEAD_SIZE",
    "BlockReader",
    "ModelDescription",
    "ModelFormatError",
    "Opener",
    "Probe",
    "ReadableFile",
    "Source",
    "SubFile",
    "TensorInfo",
    "add_dtype",
    "file_size",
    "jsonable",
    "MAX_ELEMENTS",
    "MAX_RANK",
    "numel",
    "suffix_of",
]

#: How many leading bytes :class:`Probe` reads once for every magic-byte check.
HEAD_SIZE = 4096


@runtime_checkable
class ReadableFile(Protocol):
    """The seekable binary file every parser reads through (builtin, fsspec or CVMFS file)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


#: ``opener(path, "rb")`` returns a :class:`ReadableFile`; ``open`` and ``fs.open`` both fit.
Opener = Callable[[str, str], Any]


class ModelFormatError(FormatError):
    """A model file whose header does not parse; ``what`` names the file, ``reason`` the problem."""


@dataclass
class TensorInfo:
    """A named tensor: a graph input/output or a stored weight.

    ``shape`` is row-major (outermost first); a dimension is an ``int``, a symbolic name
    (``"batch"``) or ``None`` when unknown.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class ModelDescription:
    """What a model file is, read from its header without loading it.

    ``parameters`` counts stored tensor elements (weights and buffers; a training checkpoint also
    stores optimizer state). ``dtypes`` maps a dtype name to how many of those elements use it.
    ``external_data`` lists files the model needs beside it, relative to its directory.
    ``weights`` lists the stored tensors when the header names them (safetensors, GGUF, ONNX
    initializers, PyTorch state dicts, Keras/HDF5 datasets); ``tensors`` is their count.
    ``unsafe`` is True when loading the model runs pickle, i.e. arbitrary code.
    """

    format: str
    framework: str | None = None
    parameters: int | None = None
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    tensors: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    external_data: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    unsafe: bool = False
    warnings: list[str] = field(default_factory=list)
    weights: list[TensorInfo] = field(default_factory=list)

    def to_json(self, *, weights: bool = True) -> dict[str, Any]:
        """A JSON-ready dict (``weights=False`` drops the per-tensor list, which can be long)."""
        out = asdict(self)
        out["inputs"] = [t.to_json() for t in self.inputs]
        out["outputs"] = [t.to_json() for t in self.outputs]
        if weights:
            out["weights"] = [t.to_json() for t in self.weights]
        else:
            del out["weights"]
        out["metadata"] = jsonable(self.metadata)
        return out


def jsonable(value: Any) -> Any:
    """``value`` with bytes, tuples, sets and other non-JSON types turned into JSON ones."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.hex()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


MAX_RANK = 64
"""More dimensions than any real tensor has (frameworks stop at 8 to 64)."""
MAX_ELEMENTS = 1 << 64
"""More elements than any real tensor has."""


def numel(shape: Iterable[int], what: str = "a tensor") -> int:
    """Number of elements of a tensor with this (fully known) shape.

    :class:`ModelFormatError` for a shape no real tensor has: over :data:`MAX_RANK` dimensions,
    a negative dimension, or over :data:`MAX_ELEMENTS` elements. Why: a header of a few MB
    (200,000 dimensions of 2**62, or dimensions of 4000 digits) made the product's big
    integers take time quadratic in its size, and publishing hung.
    """
    n = 1
    for rank, d in enumerate(shape, 1):
        d = int(d)
        if rank > MAX_RANK or not 0 <= d <= MAX_ELEMENTS:
            if rank > MAX_RANK:
                problem = f"over {MAX_RANK} dimensions"
            else:  # a bit count: str() of an int of over 4300 digits raises
                problem = f"a dimension {d}" if d < 0 else f"a dimension of {d.bit_length()} bits"
            raise ModelFormatError(what, f"a tensor shape with {problem}: not a real tensor")
        n *= d
        if n > MAX_ELEMENTS:
            raise ModelFormatError(what, "a tensor of over 2**64 elements: not a real tensor")
    return n


def add_dtype(dtypes: dict[str, int], dtype: str, count: int) -> None:
    """Accumulate ``count`` elements of ``dtype`` into a ``dtypes`` histogram."""
    dtypes[dtype] = dtypes.get(dtype, 0) + count


def suffix_of(name: str) -> str:
    """Lower-case extension of a path (``"model.ONNX"`` -> ``".onnx"``)."""
    return posixpath.splitext(name.replace(os.sep, "/"))[1].lower()


def file_size(f: ReadableFile) -> int:
    """Size of ``f`` in bytes, leaving its position unchanged."""
    pos = f.tell()
    try:
        return f.seek(0, os.SEEK_END)
    finally:
        f.seek(pos)


class BlockReader:
    """Random-access reads over a :class:`ReadableFile`, cached in aligned blocks.

    Parsers ask for ``(offset, n)`` pairs; neighbouring small reads hit the same block, so a walk
    over a protobuf or FlatBuffer header costs a handful of reads on the underlying file.
    ``read_at`` raises :class:`ModelFormatError` when the file ends early, naming ``what``.
    """

    def __init__(
        self, f: ReadableFile, what: str, size: int | None = None, block: int = 1 << 16
    ) -> None:
        self.f = f
        self.what = what
        self.size = file_size(f) if size is None else size
        self.block = block
        self._cache: dict[int, bytes] = {}

    def _block(self, index: int) -> bytes:
        data = self._cache.get(index)
        if data is None:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            self.f.seek(index * self.block)
            data = _read_fully(self.f, self.block)
            self._cache[index] = data
        return data

    def read_at(self, offset: int, n: int, part: str = "header", *, cache: bool = True) -> bytes:
        """Exactly ``n`` bytes at ``offset``, or :class:`ModelFormatError` (truncated ``part``).

        ``cache=False`` reads just those bytes: for isolated reads far from the header (a
        length word in front of each weight buffer) that would otherwise pull a whole block.
        """
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ModelFormatError(
                self.what,
                f"truncated {part}: needs bytes {offset}..{offset + n} but the file has "
                f"{self.size} bytes",
            )
        if n > 4 * self.block or not cache:
            self.f.seek(offset)
            data = _read_fully(self.f, n)
            if len(data) != n:
                raise ModelFormatError(self.what, f"truncated {part}: file ended at {offset}")
            return data
        out = bytearray()
        while n > 0:
            index, within = divmod(offset, self.block)
            piece = self._block(index)[within : within + n]
            if not piece:
                raise ModelFormatError(self.what, f"truncated {part}: file ended at {offset}")
            out += piece
            offset += len(piece)
            n -= len(piece)
        return bytes(out)

    def unpack_at(self, fmt: str, offset: int, part: str = "header") -> tuple[Any, ...]:
        """``struct.unpack`` of ``fmt`` at ``offset``."""
        return struct.unpack(fmt, self.read_at(offset, struct.calcsize(fmt), part))


def _read_fully(f: ReadableFile, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads (sockets, fsspec)."""
    chunks = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class SubFile(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of another file (a stored zip member).

    h5py and zipfile then read a member in place, seeking freely, without extracting it.
    """

    def __init__(self, f: ReadableFile, start: int, length: int) -> None:
        super().__init__()
        self._f = f
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0, /) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._length + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = _read_fully(self._f, n)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            size = max(0, self._length - self._pos)
        buf = bytearray(min(size, max(0, self._length - self._pos)))
        n = self.readinto(buf)
        return bytes(buf[:n])


@dataclass(frozen=True)
class Source:
    """Where a described file lives: its display path and how to open files beside it.

    ``opener`` is None when only a file object was given; then side files (ONNX external data,
    SavedModel variables) are listed but not checked.
    """

    path: str
    opener: Opener | None = None

    @property
    def name(self) -> str:
        return posixpath.basename(str(self.path).replace(os.sep, "/"))

    def sibling(self, relative: str) -> str:
        """Path of ``relative`` next to this file (or inside it, for a directory format)."""
        base = os.path.dirname(self.path) if not self.is_dir_like else self.path
        return os.path.join(base, *relative.split("/")) if base else relative

    @property
    def is_dir_like(self) -> bool:
        return False

    def exists(self, relative: str) -> bool | None:
        """Whether ``relative`` (beside this file) can be opened; None if we cannot tell."""
        if self.opener is None:
            return None
        try:
            with self.opener(self.sibling(relative), "rb"):
                return True
        except OSError:
            return False


@dataclass(frozen=True)
class DirSource(Source):
    """A directory model (SavedModel, ``.mlpackage``): ``sibling`` resolves inside it."""

    @property
    def is_dir_like(self) -> bool:
        return True


class Probe:
    """What detection looks at: the first :data:`HEAD_SIZE` bytes, the size, the name.

    Costlier views (the zip member list, the protobuf field walk) are computed once, on demand,
    and shared by every format's ``detect``.
    """

    def __init__(self, f: ReadableFile, name: str = "") -> None:
        self.f = f
        self.name = name
        self.size = file_size(f)
        f.seek(0)
        self.head = _read_fully(f, HEAD_SIZE)
        self.cache: dict[str, Any] = {}

    @property
    def suffix(self) -> str:
        """Lower-case extension of the name (``".onnx"``), used only to break ties."""
        return suffix_of(self.name)

    @property
    def basename(self) -> str:
        return posixpath.basename(self.name.replace(os.sep, "/"))

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (short at end of file)."""
        if offset + n <= len(self.head):
            return self.head[offset : offset + n]
        self.f.seek(offset)
        return _read_fully(self.f, n)

    @cached_property
    def zip_names(self) -> list[str] | None:
        """Member names when the file is a zip archive (central directory only), else None."""
        if not self.head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return None
        try:
            with zipfile.ZipFile(self.f) as z:  # type: ignore[arg-type]
                return z.namelist()
        except ZIP_ERRORS:
            return None
