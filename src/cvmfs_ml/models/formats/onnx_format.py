"""ONNX models (``onnx/onnx.proto``): opset, producer, graph inputs/outputs, initializers.

An ONNX file is a ``ModelProto`` with no magic number; detection walks its top-level fields
(:func:`._protobuf.classify`). To describe a model without reading its weights we copy every
field of the message except tensor payloads (``raw_data`` and the typed ``*_data`` fields), which
are skipped by offset, then parse that slim copy with the ``onnx`` package. The result is what
``onnx.load(path, load_external_data=False)`` would give minus the weight bytes, so a 1.9 GB
inline model costs a read of its graph structure only, and external data files (located by the
``location`` key of ``TensorProto.external_data``) are listed, counted from ``dims``, and
checked for existence but never opened.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Any

from cvmfs_ml.models.formats._protobuf import (
    LEN,
    Field,
    classify,
    encode_key,
    encode_varint,
    iter_fields,
)
from cvmfs_ml.models.formats.base import (
    MAX_RANK,
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

__all__ = ["FORMAT", "MAX_EXTERNAL_FILES", "describe", "detect", "dtype_name"]

FORMAT = "onnx"

# Fields of TensorProto that hold the data itself (onnx.proto: float_data=4 ... uint64_data=11).
_TENSOR_PAYLOAD = frozenset({4, 5, 6, 7, 9, 10, 11})
# A node or attribute larger than this may embed a weight (Constant nodes) and is slimmed too.
_BIG = 1 << 16
MAX_EXTERNAL_FILES = 65536
"""More external data files than a real model has (one per initializer at most; models save
them in one file or a few hundred): each is listed in model.json and checked on disk."""
_MAX_DEPTH = 8

_DTYPE_NAMES = {
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "FLOAT16": "float16",
    "BFLOAT16": "bfloat16",
}


def detect(probe: Probe) -> str | None:
    """``"onnx"`` when the top-level protobuf fields are those of a ``ModelProto``."""
    return FORMAT if classify(probe) == FORMAT else None


def dtype_name(elem_type: int) -> str:
    """``TensorProto.DataType`` number -> numpy-style name (``1`` -> ``"float32"``)."""
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type_{elem_type}"
    return _DTYPE_NAMES.get(name, name.lower())


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe the ONNX model in ``f`` from its protobuf structure, skipping weight bytes."""
    import onnx
    from google.protobuf.message import DecodeError

    reader = BlockReader(f, source.path)
    slim = _Slimmer(reader).model()
    try:
        model = onnx.load_model_from_string(slim)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(source.path, f"not a valid ONNX ModelProto: {exc}") from None
    return _describe_model(model, source)


class _Slimmer:
    """Copies a ModelProto field by field, dropping tensor payloads (read nothing but headers)."""

    def __init__(self, reader: BlockReader) -> None:
        self.r = reader

    def raw(self, fld: Field) -> bytes:
        return self.r.read_at(fld.start, fld.offset + fld.length - fld.start, "ONNX protobuf")

    def wrap(self, fld: Field, payload: bytes) -> bytes:
        return encode_key(fld.number, LEN) + encode_varint(len(payload)) + payload

    def fields(self, fld: Field) -> list[Field]:
        return list(iter_fields(self.r, fld.offset, fld.offset + fld.length))

    def model(self) -> bytes:
        out = bytearray()
        for fld in iter_fields(self.r, 0, self.r.size):
            if fld.number == 7 and fld.wire == LEN:  # graph
                out += self.wrap(fld, self.graph(fld, 0))
            else:
                out += self.raw(fld)
        return bytes(out)

    def graph(self, fld: Field, depth: int) -> bytes:
        out = bytearray()
        for sub in self.fields(fld):
            if sub.wire != LEN:
                out += self.raw(sub)
            elif sub.number == 5:  # initializer
                out += self.wrap(sub, self.tensor(sub))
            elif sub.number == 15:  # sparse_initializer
                out += self.wrap(sub, self.sparse(sub))
            elif sub.number == 1 and sub.length > _BIG and depth < _MAX_DEPTH:  # node
                out += self.wrap(sub, self.node(sub, depth))
            else:
                out += self.raw(sub)
        return bytes(out)

    def tensor(self, fld: Field) -> bytes:
        return b"".join(
            self.raw(sub) for sub in self.fields(fld) if sub.number not in _TENSOR_PAYLOAD
        )

    def sparse(self, fld: Field) -> bytes:
        out = bytearray()
        for sub in self.fields(fld):
            if sub.number in (1, 2) and sub.wire == LEN:  # values, indices
                out += self.wrap(sub, self.tensor(sub))
            else:
                out += self.raw(sub)
        return bytes(out)

    def node(self, fld: Field, depth: int) -> bytes:
        out = bytearray()
        for sub in self.fields(fld):
            if sub.number == 5 and sub.wire == LEN and sub.length > _BIG:  # attribute
                out += self.wrap(sub, self.attribute(sub, depth))
            else:
                out += self.raw(sub)
        return bytes(out)

    def attribute(self, fld: Field, depth: int) -> bytes:
        out = bytearray()
        for sub in self.fields(fld):
            if sub.wire != LEN:
                out += self.raw(sub)
            elif sub.number in (5, 10):  # t, tensors
                out += self.wrap(sub, self.tensor(sub))
            elif sub.number in (22, 23):  # sparse_tensor, sparse_tensors
                out += self.wrap(sub, self.sparse(sub))
            elif sub.number in (6, 11):  # g, graphs
                out += self.wrap(sub, self.graph(sub, depth + 1))
            else:
                out += self.raw(sub)
        return bytes(out)


def _dim(d: Any) -> int | str | None:
    kind = d.WhichOneof("value")
    if kind == "dim_value":
        return int(d.dim_value)
    if kind == "dim_param":
        return str(d.dim_param)
    return None


def _value_info(vi: Any) -> TensorInfo:
    kind = vi.type.WhichOneof("value")
    if kind == "tensor_type":
        tt = vi.type.tensor_type
        shape = tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else ()
        return TensorInfo(vi.name, dtype_name(tt.elem_type), shape)
    if kind == "sparse_tensor_type":
        st = vi.type.sparse_tensor_type
        shape = tuple(_dim(d) for d in st.shape.dim) if st.HasField("shape") else ()
        return TensorInfo(vi.name, "sparse_" + dtype_name(st.elem_type), shape)
    return TensorInfo(vi.name, kind or "unknown", ())


def _describe_model(model: Any, source: Source) -> ModelDescription:
    graph = model.graph
    desc = ModelDescription(format=FORMAT, framework="onnx")
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    meta: dict[str, Any] = {
        "ir_version": int(model.ir_version),
        "opset": opsets,
        "opset_version": opsets.get("ai.onnx"),
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "domain": model.domain,
        "model_version": int(model.model_version),
        "graph_name": graph.name,
        "nodes": len(graph.node),
        "op_types": dict(sorted(Counter(n.op_type for n in graph.node).items())),
    }
    if model.doc_string:
        meta["doc_string"] = model.doc_string[:2000]
    if model.metadata_props:
        meta["metadata_props"] = {p.key: p.value for p in model.metadata_props}
    if model.functions:
        meta["functions"] = len(model.functions)
    desc.metadata = meta

    initializer_names = {t.name for t in graph.initializer}
    initializer_names |= {s.values.name for s in graph.sparse_initializer}
    desc.inputs = [_value_info(v) for v in graph.input if v.name not in initializer_names]
    desc.outputs = [_value_info(v) for v in graph.output]
    if any(len(t.shape) > MAX_RANK for t in (*desc.inputs, *desc.outputs)):
        raise ModelFormatError(source.path, f"an input or output of over {MAX_RANK} dimensions")

    params = 0
    locations: dict[str, None] = {}  # in order of first use (a list's `in` made this quadratic)
    for t in graph.initializer:
        count = numel(t.dims, source.path)
        dtype = dtype_name(t.data_type)
        params += count
        add_dtype(desc.dtypes, dtype, count)
        desc.weights.append(TensorInfo(t.name, dtype, tuple(int(d) for d in t.dims)))
        if t.data_location == 1:  # TensorProto.EXTERNAL
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if not location:
                raise ModelFormatError(
                    source.path, f"initializer {t.name!r} is external but has no location"
                )
            locations[location] = None
            if len(locations) > MAX_EXTERNAL_FILES:
                raise ModelFormatError(
                    source.path, f"over {MAX_EXTERNAL_FILES} external data files: not a real model"
                )
    for s in graph.sparse_initializer:
        count = numel(s.dims, source.path)
        dtype = dtype_name(s.values.data_type)
        params += count
        add_dtype(desc.dtypes, dtype, count)
        desc.weights.append(TensorInfo(s.values.name, dtype, tuple(int(d) for d in s.dims)))
    desc.parameters = params
    desc.tensors = len(graph.initializer) + len(graph.sparse_initializer)

    for location in locations:
        norm = posixpath.normpath(location.replace("\\", "/"))
        if norm.startswith(("/", "../")) or norm == "..":
            desc.warnings.append(
                f"external data location {location!r} points outside the model directory"
            )
            continue
        desc.external_data.append(norm)
        if source.exists(norm) is False:
            desc.warnings.append(f"external data file {norm!r} is missing")
    return desc
