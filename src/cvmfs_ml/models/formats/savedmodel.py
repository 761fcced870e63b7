"""TensorFlow SavedModel directories: tags, TF version, serving signatures. No TensorFlow needed.

A SavedModel is a directory with ``saved_model.pb`` (``tensorflow/core/protobuf/
saved_model.proto``: ``saved_model_schema_version = 1``, ``repeated MetaGraphDef meta_graphs =
2``) and ``variables/variables.{index,data-*}``. Inside each ``MetaGraphDef``
(``meta_graph.proto``) we read ``meta_info_def`` (1: ``tags`` = 4, ``tensorflow_version`` = 5) and
``signature_def`` (5: map of ``SignatureDef``: ``inputs`` = 1, ``outputs`` = 2, ``method_name`` =
3, each ``TensorInfo``: ``name`` = 1, ``dtype`` = 2, ``tensor_shape`` = 3), skipping the graph
and object graph by offset. Variables (a TF table of ``BundleEntryProto``) are listed as external
data but not parsed, so ``parameters`` stays None.
"""

from __future__ import annotations

from typing import Any

from cvmfs_ml.models.formats._protobuf import (
    LEN,
    VARINT,
    Field,
    classify,
    iter_fields,
    iter_fields_bytes,
)
from cvmfs_ml.models.formats.base import (
    BlockReader,
    DirSource,
    ModelDescription,
    ModelFormatError,
    Probe,
    ReadableFile,
    Source,
    TensorInfo,
)

__all__ = ["FORMAT", "describe", "describe_dir", "detect", "detect_dir"]

FORMAT = "tf-savedmodel"
_MAX_SMALL = 16 << 20

# tensorflow/core/framework/types.proto DataType.
_DTYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32",
    14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16", 18: "complex128",
    19: "float16", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
}  # fmt: skip


def detect(probe: Probe) -> str | None:
    """``"tf-savedmodel"`` for a ``saved_model.pb`` file (directories: :func:`detect_dir`)."""
    return FORMAT if classify(probe) == FORMAT else None


def detect_dir(source: DirSource) -> str | None:
    """``"tf-savedmodel"`` when the directory holds ``saved_model.pb`` or ``.pbtxt``."""
    if source.exists("saved_model.pb") or source.exists("saved_model.pbtxt"):
        return FORMAT
    return None


def describe_dir(source: DirSource, listdir: Any = None) -> ModelDescription:
    """Describe a SavedModel directory (``listdir(path)`` lists ``variables/`` when given)."""
    if source.opener is None:
        raise ModelFormatError(source.path, "a directory model needs an opener")
    if source.exists("saved_model.pb"):
        with source.opener(source.sibling("saved_model.pb"), "rb") as f:
            desc = describe(f, Source(source.sibling("saved_model.pb")))
    elif source.exists("saved_model.pbtxt"):
        desc = ModelDescription(format=FORMAT, framework="tensorflow")
        desc.warnings.append("saved_model.pbtxt (text format) is not parsed")
    else:
        raise ModelFormatError(source.path, "no saved_model.pb in the directory")
    variables: list[str] = []
    if listdir is not None:
        try:
            variables = sorted(f"variables/{n}" for n in listdir(source.sibling("variables")))
        except OSError:
            variables = []
    else:
        for name in ("variables.index", "variables.data-00000-of-00001"):
            if source.exists(f"variables/{name}"):
                variables.append(f"variables/{name}")
    desc.external_data = variables
    if variables and "variables/variables.index" not in variables:
        desc.warnings.append("variables/ has no variables.index")
    if source.exists("keras_metadata.pb"):
        desc.metadata["keras"] = True
    if source.exists("fingerprint.pb"):
        desc.metadata["fingerprint"] = True
    return desc


def _text(data: bytes, fld: Field) -> str:
    return data[fld.offset : fld.offset + fld.length].decode("utf-8", errors="replace")


def _sub(data: bytes, fld: Field) -> bytes:
    return data[fld.offset : fld.offset + fld.length]


def _tensor_info(name: str, data: bytes, what: str) -> TensorInfo:
    dtype, shape = "unknown", ()
    for fld in iter_fields_bytes(data, what):
        if fld.number == 2 and fld.wire == VARINT:
            dtype = _DTYPES.get(fld.value, f"type_{fld.value}")
        elif fld.number == 3 and fld.wire == LEN:
            dims: list[int | None] = []
            for d in iter_fields_bytes(_sub(data, fld), what):
                if d.number == 2 and d.wire == LEN:
                    size = -1
                    for s in iter_fields_bytes(_sub(_sub(data, fld), d), what):
                        if s.number == 1 and s.wire == VARINT:
                            size = s.value - (1 << 64) if s.value >= 1 << 63 else s.value
                    dims.append(size if size >= 0 else None)
            shape = tuple(dims)
    return TensorInfo(name, dtype, shape)


def _map_entry(data: bytes, what: str) -> tuple[str, bytes]:
    key, value = "", b""
    for fld in iter_fields_bytes(data, what):
        if fld.number == 1 and fld.wire == LEN:
            key = _text(data, fld)
        elif fld.number == 2 and fld.wire == LEN:
            value = _sub(data, fld)
    return key, value


def _signature(data: bytes, what: str) -> dict[str, Any]:
    sig: dict[str, Any] = {"inputs": [], "outputs": [], "method_name": ""}
    for fld in iter_fields_bytes(data, what):
        if fld.number in (1, 2) and fld.wire == LEN:
            key, value = _map_entry(_sub(data, fld), what)
            sig["inputs" if fld.number == 1 else "outputs"].append(_tensor_info(key, value, what))
        elif fld.number == 3 and fld.wire == LEN:
            sig["method_name"] = _text(data, fld)
    return sig


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe ``saved_model.pb``: meta graphs, tags, TF version and signatures."""
    what = source.path
    reader = BlockReader(f, what)
    schema_version = None
    graphs: list[dict[str, Any]] = []
    signatures: dict[str, dict[str, Any]] = {}
    for top in iter_fields(reader, 0, reader.size):
        if top.number == 1 and top.wire == VARINT:
            schema_version = top.value
        elif top.number == 2 and top.wire == LEN:
            info: dict[str, Any] = {"tags": [], "tensorflow_version": None, "signatures": []}
            for fld in iter_fields(reader, top.offset, top.offset + top.length):
                if fld.wire != LEN or fld.number not in (1, 5):
                    continue
                if fld.length > _MAX_SMALL:
                    raise ModelFormatError(what, f"MetaGraphDef field {fld.number} is too large")
                data = reader.read_at(fld.offset, fld.length, "SavedModel")
                if fld.number == 1:
                    for sub in iter_fields_bytes(data, what):
                        if sub.number == 4 and sub.wire == LEN:
                            info["tags"].append(_text(data, sub))
                        elif sub.number == 5 and sub.wire == LEN:
                            info["tensorflow_version"] = _text(data, sub)
                else:
                    key, value = _map_entry(data, what)
                    info["signatures"].append(key)
                    signatures.setdefault(key, _signature(value, what))
            graphs.append(info)
        else:
            raise ModelFormatError(what, f"unexpected SavedModel field {top.number}")
    if not graphs:
        raise ModelFormatError(what, "SavedModel has no meta graphs")
    desc = ModelDescription(format=FORMAT, framework="tensorflow")
    desc.metadata = {
        "saved_model_schema_version": schema_version,
        "meta_graphs": [
            {"tags": g["tags"], "tensorflow_version": g["tensorflow_version"]} for g in graphs
        ],
        "signatures": {
            k: {
                "method_name": v["method_name"],
                "inputs": [t.to_json() for t in v["inputs"]],
                "outputs": [t.to_json() for t in v["outputs"]],
            }
            for k, v in signatures.items()
        },
    }
    main = signatures.get("serving_default") or next(iter(signatures.values()), None)
    if main is not None:
        desc.inputs = list(main["inputs"])
        desc.outputs = list(main["outputs"])
    return desc
