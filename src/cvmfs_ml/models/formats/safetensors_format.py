"""safetensors (huggingface/safetensors ``safetensors/src/tensor.rs``): header-only description.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then the data region.
The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data region) plus an optional ``"__metadata__"`` map of strings. We validate as
strictly as the reference implementation: ``N`` within the file and at most 100 MB, a JSON
object, known dtypes, ``end - begin`` equal to the element count times the dtype size, and the
offsets tiling the data region exactly (no gap, no overlap, nothing left over).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from cvmfs_ml.cvmfs import jsontext
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

__all__ = ["DTYPE_BITS", "FORMAT", "MAX_HEADER", "describe", "detect"]

FORMAT = "safetensors"
#: The reference implementation refuses larger headers (``MAX_HEADER_SIZE``).
MAX_HEADER = 100_000_000

#: Bits per element of every dtype safetensors knows.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

_FRAMEWORKS = {"pt": "pytorch", "tf": "tensorflow", "flax": "flax", "np": "numpy", "mlx": "mlx"}


def detect(probe: Probe) -> str | None:
    """``"safetensors"`` when the first 8 bytes are a plausible length and a JSON object follows."""
    if probe.size < 10 or len(probe.head) < 10:
        return None
    (n,) = struct.unpack("<Q", probe.head[:8])
    if n < 2 or n > probe.size - 8 or n > MAX_HEADER:
        return None
    return FORMAT if probe.head[8:9] == b"{" else None


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe the tensors of a safetensors file from its JSON header (weights are not read)."""
    what = source.path
    reader = BlockReader(f, what)
    if reader.size < 8:
        raise ModelFormatError(what, f"truncated safetensors header: file has {reader.size} bytes")
    (n,) = reader.unpack_at("<Q", 0)
    if n > MAX_HEADER:
        raise ModelFormatError(
            what, f"safetensors header length {n} exceeds the {MAX_HEADER}-byte limit"
        )
    if n > reader.size - 8:
        raise ModelFormatError(
            what, f"safetensors header length {n} exceeds the file ({reader.size} bytes)"
        )
    raw = reader.read_at(8, n, "safetensors header")
    if not raw.startswith(b"{"):
        raise ModelFormatError(what, "safetensors header does not start with '{'")
    try:
        header = jsontext.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(what, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(what, "safetensors header is not a JSON object")
    return _describe_header(header, reader.size - 8 - n, what)


def _describe_header(header: dict[str, Any], data_size: int, what: str) -> ModelDescription:
    desc = ModelDescription(format=FORMAT)
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ModelFormatError(what, "safetensors __metadata__ must map strings to strings")
        desc.metadata = dict(metadata)
        desc.framework = _FRAMEWORKS.get(metadata.get("format", ""))
    spans: list[tuple[int, int, str]] = []
    params = 0
    for name, info in header.items():
        dtype, shape, begin, end = _tensor_entry(name, info, what)
        count = numel(shape, what)
        bits = count * DTYPE_BITS[dtype]
        if bits % 8 or end - begin != bits // 8:
            raise ModelFormatError(
                what,
                f"tensor {name!r}: {dtype}{list(shape)} needs {bits / 8:g} bytes but "
                f"data_offsets span {end - begin}",
            )
        spans.append((begin, end, name))
        params += count
        add_dtype(desc.dtypes, dtype, count)
        desc.weights.append(TensorInfo(name, dtype, shape))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            problem = "overlaps the previous tensor" if begin < pos else f"leaves a gap at {pos}"
            raise ModelFormatError(what, f"tensor {name!r} at offset {begin} {problem}")
        pos = end
    if pos != data_size:
        raise ModelFormatError(
            what,
            f"tensors cover {pos} bytes but the data region has {data_size} bytes"
            + (" (file truncated?)" if pos > data_size else ""),
        )
    desc.parameters = params
    desc.tensors = len(spans)
    return desc


def _tensor_entry(name: str, info: Any, what: str) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise ModelFormatError(what, f"tensor {name!r}: entry is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise ModelFormatError(what, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ModelFormatError(what, f"tensor {name!r}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ModelFormatError(what, f"tensor {name!r}: bad data_offsets {offsets!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]
