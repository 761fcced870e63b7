"""GGUF (ggml ``docs/gguf.md``, ``gguf-py/gguf/constants.py``): header, architecture, quantisation.

Layout: magic ``GGUF``, ``uint32`` version (1-3), tensor count and key/value count (``uint32`` in
v1, ``uint64`` since v2), the key/value pairs (typed values, arrays included), one info record
per tensor (name, dims, ggml type, offset into the data section), then the data section aligned
to ``general.alignment`` (default 32). We read this incrementally through a block cache: long
arrays such as a 150 000-entry vocabulary are skipped by length, and no tensor data is read.
Byte order is taken from the version field, so big-endian files are read too.
"""

from __future__ import annotations

import struct
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

__all__ = ["FILE_TYPES", "FORMAT", "GGML_TYPES", "describe", "detect"]

FORMAT = "gguf"
MAGIC = b"GGUF"

#: ggml tensor type -> (name, elements per block, bytes per block) (``GGML_QUANT_SIZES``).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip

#: ``general.file_type`` (``LlamaFileType``, without its ``MOSTLY_`` prefix) -> name.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}  # fmt: skip

# GGUF value types: number -> (name, struct code); 8 = string, 9 = array.
_SCALARS = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_MAX_INLINE_ARRAY = 64
_MAX_STRING_KEEP = 16384


def detect(probe: Probe) -> str | None:
    """``"gguf"`` when the file starts with the ``GGUF`` magic and a known version."""
    if probe.head[:4] != MAGIC or len(probe.head) < 8:
        return None
    return FORMAT if _byte_order(probe.head[4:8]) is not None else None


def _byte_order(raw: bytes) -> str | None:
    for order in "<>":
        (version,) = struct.unpack(order + "I", raw)
        if version in (1, 2, 3):
            return order
    return None


class _Cursor:
    """Sequential reads at a position, through the block cache, with bounds checks."""

    def __init__(self, reader: BlockReader, order: str, pos: int = 0) -> None:
        self.r = reader
        self.order = order
        self.pos = pos
        self.wide = True  # 64-bit counts and lengths (v2+)

    def take(self, n: int, part: str) -> bytes:
        data = self.r.read_at(self.pos, n, part)
        self.pos += n
        return data

    def unpack(self, code: str, part: str) -> Any:
        fmt = self.order + code
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), part))[0]

    def count(self, part: str) -> int:
        return int(self.unpack("Q" if self.wide else "I", part))

    def string_length(self, part: str) -> int:
        n = self.count(part)
        if n > self.r.size - self.pos:
            raise ModelFormatError(
                self.r.what,
                f"GGUF {part}: string of {n} bytes at byte {self.pos} runs past end of file",
            )
        return n

    def string(self, part: str) -> str:
        return self.take(self.string_length(part), part).decode("utf-8", errors="replace")

    def skip_string(self, part: str) -> None:
        n = self.string_length(part)  # advances past the length word first
        self.pos += n


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype][1], f"value of {key}")
    if vtype == _STRING:
        text = cur.string(f"value of {key}")
        return text if len(text) <= _MAX_STRING_KEEP else text[:_MAX_STRING_KEEP] + "…"
    if vtype == _ARRAY:
        if depth > 4:
            raise ModelFormatError(cur.r.what, f"GGUF key {key!r}: arrays nested too deeply")
        etype = cur.unpack("I", f"array type of {key}")
        n = cur.count(f"array length of {key}")
        if n > cur.r.size - cur.pos:
            raise ModelFormatError(
                cur.r.what, f"GGUF key {key!r}: array of {n} items runs past end of file"
            )
        if n > _MAX_INLINE_ARRAY:
            _skip_array(cur, etype, n, key, depth)
            return {"type": "array", "element_type": _type_name(etype), "length": n}
        return [_value(cur, etype, key, depth + 1) for _ in range(n)]
    raise ModelFormatError(cur.r.what, f"GGUF key {key!r}: unknown value type {vtype}")


def _skip_array(cur: _Cursor, etype: int, n: int, key: str, depth: int) -> None:
    if etype in _SCALARS:
        cur.pos += n * struct.calcsize(_SCALARS[etype][1])
        if cur.pos > cur.r.size:
            raise ModelFormatError(cur.r.what, f"GGUF key {key!r}: array runs past end of file")
    elif etype == _STRING:
        for _ in range(n):
            cur.skip_string(f"array of {key}")
    else:
        for _ in range(n):
            _value(cur, etype, key, depth + 1)


def _type_name(vtype: int) -> str:
    if vtype in _SCALARS:
        return _SCALARS[vtype][0]
    return {_STRING: "string", _ARRAY: "array"}.get(vtype, f"type_{vtype}")


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe a GGUF file: its metadata key/values and tensor infos (no tensor data read)."""
    what = source.path
    reader = BlockReader(f, what)
    if reader.size < 16:
        raise ModelFormatError(what, f"truncated GGUF header: the file has {reader.size} bytes")
    head = reader.read_at(0, 8, "GGUF header")
    if head[:4] != MAGIC:
        raise ModelFormatError(what, f"bad GGUF magic {head[:4]!r} (expected b'GGUF')")
    order = _byte_order(head[4:8])
    if order is None:
        (version,) = struct.unpack("<I", head[4:8])
        raise ModelFormatError(what, f"unsupported GGUF version {version} (known: 1, 2, 3)")
    cur = _Cursor(reader, order, 8)
    version = struct.unpack(order + "I", head[4:8])[0]
    cur.wide = version >= 2
    n_tensors = cur.count("tensor count")
    n_kv = cur.count("key/value count")
    if n_kv * 13 > reader.size or n_tensors * 24 > reader.size:
        raise ModelFormatError(
            what, f"GGUF header claims {n_tensors} tensors and {n_kv} keys: too many for the file"
        )
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = cur.unpack("I", f"type of {key}")
        kv[key] = _value(cur, vtype, key)

    desc = ModelDescription(format=FORMAT, framework="ggml")
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    alignment = kv.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(what, f"GGUF general.alignment {alignment!r} is not a power of 2")
    data_start = -(-cur.pos // alignment) * alignment
    params = 0
    bytes_by_type: dict[str, int] = {}
    for name, shape, gtype, offset in infos:
        count = numel(shape, what)
        tname, block, size = GGML_TYPES.get(gtype, (f"type_{gtype}", 0, 0))
        params += count
        add_dtype(desc.dtypes, tname, count)
        desc.weights.append(TensorInfo(name, tname, tuple(reversed(shape))))
        if offset % alignment:
            raise ModelFormatError(what, f"GGUF tensor {name!r}: offset {offset} is not aligned")
        if not block:
            desc.warnings.append(f"tensor {name!r} has unknown ggml type {gtype}")
            continue
        if shape and shape[0] % block:
            raise ModelFormatError(
                what, f"GGUF tensor {name!r}: {tname} needs rows of multiples of {block}"
            )
        nbytes = count // block * size
        add_dtype(bytes_by_type, tname, nbytes)
        if data_start + offset + nbytes > reader.size:
            raise ModelFormatError(
                what,
                f"GGUF tensor {name!r} ends at byte {data_start + offset + nbytes} but the file "
                f"has {reader.size} bytes (truncated?)",
            )
    desc.parameters = params
    desc.tensors = len(infos)
    desc.metadata = _metadata(kv, version, order, bytes_by_type)
    return desc


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.unpack("I", f"dims of tensor {name}")
    if n_dims > _MAX_DIMS:
        raise ModelFormatError(cur.r.what, f"GGUF tensor {name!r} has {n_dims} dimensions")
    shape = tuple(cur.count(f"shape of tensor {name}") for _ in range(n_dims))
    gtype = cur.unpack("I", f"type of tensor {name}")
    offset = cur.unpack("Q", f"offset of tensor {name}")
    return name, shape, gtype, offset


def _metadata(
    kv: dict[str, Any], version: int, order: str, bytes_by_type: dict[str, int]
) -> dict[str, Any]:
    meta: dict[str, Any] = {"version": version, "byte_order": "big" if order == ">" else "little"}
    arch = kv.get("general.architecture")
    meta["architecture"] = arch
    meta["name"] = kv.get("general.name")
    file_type = kv.get("general.file_type")
    if isinstance(file_type, int):
        meta["file_type"] = file_type
        meta["quantization"] = FILE_TYPES.get(file_type, f"file_type_{file_type}")
    elif bytes_by_type:
        # No declared file type: name the type holding most of the bytes.
        meta["quantization"] = max(bytes_by_type.items(), key=lambda kv: kv[1])[0]
    else:
        meta["quantization"] = None
    if "general.quantization_version" in kv:
        meta["quantization_version"] = kv["general.quantization_version"]
    if isinstance(arch, str) and f"{arch}.context_length" in kv:
        meta["context_length"] = kv[f"{arch}.context_length"]
    meta["kv"] = kv
    return meta
