"""TensorFlow Lite / LiteRT models: a FlatBuffer with file identifier ``TFL3`` at offset 4.

Read without TensorFlow, following ``tensorflow/compiler/mlir/lite/schema/schema.fbs``:
``Model`` {version: uint = 0, operator_codes = 1, subgraphs = 2, description: string = 3,
buffers = 4, metadata_buffer = 5, metadata = 6, signature_defs = 7}; ``SubGraph`` {tensors = 0,
inputs = 1, outputs = 2, operators = 3, name = 4}; ``Tensor`` {shape = 0, type: byte = 1,
buffer: uint = 2, name = 3, shape_signature = 7}; ``Buffer`` {data: [ubyte] = 0, offset: ulong =
1, size: ulong = 2}. FlatBuffers encoding: a table starts with an ``int32`` back-offset to its
vtable (``uint16`` vtable size, object size, then one ``uint16`` field offset per field); vectors
and strings are a ``uint32`` length followed by the elements. A tensor is a parameter when its
buffer holds data; only the length word of each buffer is read.
"""

from __future__ import annotations

from typing import Any

from cvmfs_ml.models.formats.base import (
    BlockReader,
    ModelDescription,
    ModelFormatError,
    Probe,
    ReadableFile,
    Source,
    TensorInfo,
    add_dtype,
    numel,
)

__all__ = ["FORMAT", "IDENTIFIER", "describe", "detect"]

FORMAT = "tflite"
IDENTIFIER = b"TFL3"

# schema.fbs enum TensorType.
_TYPES = [
    "float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16", "complex64",
    "int8", "float64", "complex128", "uint64", "resource", "variant", "uint32", "uint16",
    "int4", "bfloat16",
]  # fmt: skip


def detect(probe: Probe) -> str | None:
    """``"tflite"`` when bytes 4..8 are the ``TFL3`` identifier and the root offset fits."""
    if len(probe.head) < 12 or probe.head[4:8] != IDENTIFIER:
        return None
    root = int.from_bytes(probe.head[:4], "little")
    return FORMAT if 8 <= root < probe.size else None


class _FlatBuffer:
    def __init__(self, reader: BlockReader) -> None:
        self.r = reader

    def u8(self, pos: int) -> int:
        return self.r.read_at(pos, 1, "FlatBuffer")[0]

    def u16(self, pos: int) -> int:
        return int.from_bytes(self.r.read_at(pos, 2, "FlatBuffer"), "little")

    def u32(self, pos: int, *, cache: bool = True) -> int:
        return int.from_bytes(self.r.read_at(pos, 4, "FlatBuffer", cache=cache), "little")

    def i32(self, pos: int) -> int:
        return int.from_bytes(self.r.read_at(pos, 4, "FlatBuffer"), "little", signed=True)

    def u64(self, pos: int) -> int:
        return int.from_bytes(self.r.read_at(pos, 8, "FlatBuffer"), "little")

    def field(self, table: int, index: int) -> int | None:
        vtable = table - self.i32(table)
        if vtable < 0 or vtable >= self.r.size:
            raise ModelFormatError(self.r.what, f"FlatBuffer vtable out of range at {table}")
        vsize = self.u16(vtable)
        if 4 + 2 * index >= vsize:
            return None
        off = self.u16(vtable + 4 + 2 * index)
        return table + off if off else None

    def table(self, table: int, index: int) -> int | None:
        pos = self.field(table, index)
        return None if pos is None else pos + self.u32(pos)

    def vector(self, table: int, index: int, elem: int) -> tuple[int, int]:
        """(start of elements, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, index)
        if pos is None:
            return 0, 0
        vec = pos + self.u32(pos)
        n = self.u32(vec)
        if vec + 4 + n * elem > self.r.size:
            raise ModelFormatError(
                self.r.what, f"FlatBuffer vector of {n} items at {vec} runs past end of file"
            )
        return vec + 4, n

    def tables(self, table: int, index: int) -> list[int]:
        start, n = self.vector(table, index, 4)
        return [start + 4 * i + self.u32(start + 4 * i) for i in range(n)]

    def ints(self, table: int, index: int) -> list[int] | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        start, n = self.vector(table, index, 4)
        raw = self.r.read_at(start, 4 * n, "FlatBuffer")
        return [int.from_bytes(raw[i : i + 4], "little", signed=True) for i in range(0, 4 * n, 4)]

    def string(self, table: int, index: int) -> str | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        start, n = self.vector(table, index, 1)
        return self.r.read_at(start, n, "FlatBuffer").decode("utf-8", errors="replace")

    def scalar(self, table: int, index: int, kind: str, default: int = 0) -> int:
        pos = self.field(table, index)
        if pos is None:
            return default
        return {"u8": self.u8, "u32": self.u32, "u64": self.u64}[kind](pos)


def _tensor(fb: _FlatBuffer, t: int) -> tuple[TensorInfo, int]:
    type_id = fb.scalar(t, 1, "u8")
    dtype = _TYPES[type_id] if type_id < len(_TYPES) else f"type_{type_id}"
    shape: list[int | None] = list(fb.ints(t, 0) or [])
    signature = fb.ints(t, 7)
    if signature is not None and len(signature) == len(shape):
        shape = [None if s < 0 else d for d, s in zip(shape, signature, strict=True)]
    name = fb.string(t, 3) or ""
    return TensorInfo(name, dtype, tuple(shape)), fb.scalar(t, 2, "u32")


def _buffer_has_data(fb: _FlatBuffer, buf: int) -> bool:
    pos = fb.field(buf, 0)
    if pos is not None and fb.u32(pos + fb.u32(pos), cache=False) > 0:
        return True
    return fb.scalar(buf, 2, "u64") > 0  # >2 GB models keep data after the FlatBuffer


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe a TFLite model: version, subgraphs, inputs/outputs, constant tensors."""
    what = source.path
    reader = BlockReader(f, what)
    if reader.size < 12 or reader.read_at(4, 4) != IDENTIFIER:
        raise ModelFormatError(what, "no TFL3 FlatBuffer identifier at offset 4")
    fb = _FlatBuffer(reader)
    root = fb.u32(0)
    if root < 8 or root >= reader.size:
        raise ModelFormatError(what, f"FlatBuffer root offset {root} is out of range")
    subgraphs = fb.tables(root, 2)
    buffers = fb.tables(root, 4)
    desc = ModelDescription(format=FORMAT, framework="tflite")
    meta: dict[str, Any] = {
        "version": fb.scalar(root, 0, "u32"),
        "description": fb.string(root, 3),
        "subgraphs": len(subgraphs),
        "operator_codes": len(fb.tables(root, 1)),
        "buffers": len(buffers),
    }
    metadata_names: dict[str, Any] = {}
    for m in fb.tables(root, 6):
        name = fb.string(m, 0) or ""
        index = fb.scalar(m, 1, "u32")
        value: Any = None
        if name == "min_runtime_version" and index < len(buffers):
            start, n = fb.vector(buffers[index], 0, 1)
            if n <= 64:
                value = reader.read_at(start, n).rstrip(b"\0").decode("ascii", "replace")
        metadata_names[name] = value
    if metadata_names:
        meta["metadata"] = metadata_names
    signatures = [fb.string(s, 2) for s in fb.tables(root, 7)]
    if signatures:
        meta["signatures"] = signatures
    desc.metadata = meta

    params = 0
    counted: set[int] = set()
    for index, sg in enumerate(subgraphs):
        tensors = fb.tables(sg, 0)
        infos = []
        for t in tensors:
            info, buffer_index = _tensor(fb, t)
            infos.append(info)
            if buffer_index in counted or not 0 < buffer_index < len(buffers):
                continue
            if _buffer_has_data(fb, buffers[buffer_index]) and None not in info.shape:
                counted.add(buffer_index)
                count = numel((d for d in info.shape if isinstance(d, int)), what)
                params += count
                add_dtype(desc.dtypes, info.dtype, count)
                desc.weights.append(info)
        if index == 0:
            for field_index, target in ((1, desc.inputs), (2, desc.outputs)):
                for i in fb.ints(sg, field_index) or []:
                    if not 0 <= i < len(infos):
                        raise ModelFormatError(what, f"subgraph tensor index {i} out of range")
                    target.append(infos[i])
    desc.parameters = params
    desc.tensors = len(counted)
    return desc
