"""Protocol-buffer wire format, read field by field through a :class:`BlockReader`.

ONNX, CoreML ``.mlmodel`` and TensorFlow ``saved_model.pb`` are protobuf messages with no magic
number. Walking the top-level fields (skipping every length-delimited payload by offset) is both
the detection test (the fields must tile the file exactly and match one schema) and the way to
describe a model without reading its weights. Wire format: protobuf "Encoding" documentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from cvmfs_ml.models.formats.base import BlockReader, ModelFormatError, Probe

__all__ = [
    "LEN",
    "VARINT",
    "Field",
    "classify",
    "decode_varint",
    "encode_key",
    "encode_varint",
    "iter_fields",
    "iter_fields_bytes",
    "packed_varints",
]

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Field:
    """One field of a message: ``value`` for varints/fixed, ``offset``/``length`` for payloads.

    ``start`` is where the field's key begins, so ``[start, offset + length)`` is its raw bytes.
    """

    number: int
    wire: int
    start: int
    offset: int
    length: int
    value: int = 0


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, new position) of the varint at ``pos``; ValueError if bad or truncated."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def _varint_at(reader: BlockReader, pos: int, end: int) -> tuple[int, int]:
    chunk = reader.read_at(pos, min(10, end - pos), "protobuf")
    try:
        value, used = decode_varint(chunk, 0)
    except ValueError as exc:
        raise ModelFormatError(reader.what, f"bad protobuf varint at byte {pos}: {exc}") from None
    return value, pos + used


def iter_fields(reader: BlockReader, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in ``[start, end)``, skipping payloads without reading them.

    Raises :class:`ModelFormatError` when a field is malformed or runs past ``end`` (a truncated
    file), so a walk that finishes proves the fields tile the range exactly.
    """
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _varint_at(reader, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ModelFormatError(reader.what, f"protobuf field number 0 at byte {key_start}")
        if wire == VARINT:
            value, pos = _varint_at(reader, pos, end)
            yield Field(number, wire, key_start, pos, 0, value)
        elif wire == LEN:
            length, pos = _varint_at(reader, pos, end)
            if pos + length > end:
                raise ModelFormatError(
                    reader.what,
                    f"truncated protobuf: field {number} at byte {key_start} needs {length} "
                    f"bytes but only {end - pos} remain",
                )
            yield Field(number, wire, key_start, pos, length)
            pos += length
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
            raw = reader.read_at(pos, size, "protobuf") if pos + size <= end else b""
            if len(raw) != size:
                raise ModelFormatError(reader.what, f"truncated protobuf at byte {pos}")
            yield Field(number, wire, key_start, pos, size, int.from_bytes(raw, "little"))
            pos += size
        else:
            raise ModelFormatError(
                reader.what, f"unsupported protobuf wire type {wire} at byte {key_start}"
            )


def iter_fields_bytes(data: bytes, what: str) -> Iterator[Field]:
    """:func:`iter_fields` over an in-memory message (offsets are into ``data``)."""
    yield from iter_fields(_BytesReader(data, what), 0, len(data))


class _BytesReader(BlockReader):
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what
        self.size = len(data)

    def read_at(self, offset: int, n: int, part: str = "header", *, cache: bool = True) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise ModelFormatError(self.what, f"truncated {part} at byte {offset}")
        return self.data[offset : offset + n]


def packed_varints(data: bytes) -> list[int]:
    """The values of a packed repeated varint field."""
    out, pos = [], 0
    while pos < len(data):
        value, pos = decode_varint(data, pos)
        out.append(value)
    return out


# Schemas of the top-level message of each protobuf model format: field number -> wire type.
_ONNX = {1: VARINT, 2: LEN, 3: LEN, 4: LEN, 5: VARINT, 6: LEN, 7: LEN, 8: LEN, 14: LEN,
         20: LEN, 25: LEN}  # fmt: skip
_SAVEDMODEL = {1: VARINT, 2: LEN}
_MAX_TOP_FIELDS = 4096


def _fits(fields: dict[int, int], schema: dict[int, int]) -> bool:
    return all(schema.get(n) == w for n, w in fields.items())


def _plausible(number: int, wire: int) -> bool:
    if number >= 200:
        return wire == LEN
    return _ONNX.get(number) == wire or (number == 10 and wire == VARINT)


def _coreml_fits(fields: dict[int, int]) -> bool:
    return all(
        (n in (1, 10) and w == VARINT) or (n == 2 and w == LEN) or (n >= 200 and w == LEN)
        for n, w in fields.items()
    )


def classify(probe: Probe) -> str | None:
    """``"onnx"``, ``"coreml"``, ``"tf-savedmodel"`` or None, from the top-level field layout.

    The walk reads only keys and lengths and must end exactly at end of file. ONNX needs
    ``ir_version`` plus a graph or opset import; CoreML needs ``specificationVersion`` plus a
    model-type field (numbers >= 200); a SavedModel has only fields 1 and 2 and is named
    ``saved_model.pb`` or has a MetaGraphDef with a graph in field 2.
    """
    if "protobuf" in probe.cache:
        return probe.cache["protobuf"]
    result = _classify(probe)
    probe.cache["protobuf"] = result
    return result


def _classify(probe: Probe) -> str | None:
    if probe.size < 2 or probe.head[0] & 7 not in (VARINT, LEN) or probe.head[0] >> 3 == 0:
        return None
    reader = BlockReader(probe.f, probe.name or "<file>", probe.size, block=1 << 14)
    fields: dict[int, int] = {}
    first: dict[int, Field] = {}
    try:
        for count, fld in enumerate(iter_fields(reader, 0, probe.size)):
            if count >= _MAX_TOP_FIELDS or fields.get(fld.number, fld.wire) != fld.wire:
                return None
            if not _plausible(fld.number, fld.wire):
                return None  # fits none of the schemas: stop before reading any further
            fields[fld.number] = fld.wire
            first.setdefault(fld.number, fld)
    except ModelFormatError:
        return None
    version = first[1].value if 1 in first and first[1].wire == VARINT else 0
    if _fits(fields, _ONNX) and 0 < version < 1000 and (7 in fields or 8 in fields):
        return "onnx"
    has_type = any(n >= 200 for n in fields) or (probe.suffix == ".mlmodel" and 2 in fields)
    if _coreml_fits(fields) and 0 < version < 1000 and has_type:
        return "coreml"
    saved_model_name = probe.basename == "saved_model.pb"
    if (
        _fits(fields, _SAVEDMODEL)
        and 2 in first
        and (saved_model_name or _looks_like_metagraph(reader, first[2]))
    ):
        return "tf-savedmodel"
    return None


def _looks_like_metagraph(reader: BlockReader, fld: Field) -> bool:
    try:
        inner = list(iter_fields(reader, fld.offset, fld.offset + fld.length))
    except ModelFormatError:
        return False
    numbers = {f.number for f in inner}
    return all(f.wire == LEN for f in inner) and 2 in numbers and numbers <= set(range(1, 8))
