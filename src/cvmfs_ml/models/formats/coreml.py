"""Core ML models: ``.mlmodel`` protobuf files and ``.mlpackage`` directories.

An ``.mlmodel`` is a ``CoreML.Specification.Model`` (coremltools ``mlmodel/format/Model.proto``):
``specificationVersion`` = 1, ``description`` = 2 (``ModelDescription``: ``input`` = 1,
``output`` = 10, ``metadata`` = 100), ``isUpdatable`` = 10, and one model-type field numbered
200 and up (``neuralNetwork`` = 500, ``mlProgram`` = 502, ...). Feature types follow
``FeatureTypes.proto``. An ``.mlpackage`` is a directory with ``Manifest.json``
(``itemInfoEntries``, ``rootModelIdentifier``) naming the spec file under ``Data/`` and the
weights beside it. Parsed without coremltools; the model-type payload is skipped by offset.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.models.formats._protobuf import (
    LEN,
    VARINT,
    classify,
    iter_fields,
    iter_fields_bytes,
    packed_varints,
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

__all__ = ["FORMAT", "MODEL_TYPES", "describe", "describe_dir", "detect", "detect_dir"]

FORMAT = "coreml"
_MAX_DESCRIPTION = 16 << 20

#: ``Model.Type`` oneof field number -> name.
MODEL_TYPES = {
    200: "pipelineClassifier", 201: "pipelineRegressor", 202: "pipeline",
    300: "glmRegressor", 301: "supportVectorRegressor", 302: "treeEnsembleRegressor",
    303: "neuralNetworkRegressor", 304: "bayesianProbitRegressor",
    400: "glmClassifier", 401: "supportVectorClassifier", 402: "treeEnsembleClassifier",
    403: "neuralNetworkClassifier", 404: "kNearestNeighborsClassifier",
    500: "neuralNetwork", 501: "itemSimilarityRecommender", 502: "mlProgram",
    555: "customModel", 556: "linkedModel", 560: "classConfidenceThresholding",
    600: "oneHotEncoder", 601: "imputer", 602: "featureVectorizer", 603: "dictVectorizer",
    604: "scaler", 606: "categoricalMapping", 607: "normalizer", 609: "arrayFeatureExtractor",
    610: "nonMaximumSuppression", 900: "identity",
    2000: "textClassifier", 2001: "wordTagger", 2002: "visionFeaturePrint",
    2003: "soundAnalysisPreprocessing", 2004: "gazetteer", 2005: "wordEmbedding",
    2006: "audioFeaturePrint", 3000: "serializedModel",
}  # fmt: skip

_FEATURE_KINDS = {1: "int64", 2: "double", 3: "string", 4: "image", 5: "multiArray",
                  6: "dictionary", 7: "sequence", 8: "state"}  # fmt: skip
_ARRAY_DTYPES = {65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8",
                 65552: "float16"}  # fmt: skip


def detect(probe: Probe) -> str | None:
    """``"coreml"`` when the protobuf layout is a Core ML ``Model``."""
    return FORMAT if classify(probe) == FORMAT else None


def _manifest(source: DirSource) -> dict[str, Any] | None:
    if source.opener is None or not source.exists("Manifest.json"):
        return None
    try:
        with source.opener(source.sibling("Manifest.json"), "rb") as f:
            data = jsontext.loads(f.read(16 << 20))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("itemInfoEntries"), dict):
        return data
    return None


def detect_dir(source: DirSource) -> str | None:
    """``"coreml"`` for an ``.mlpackage`` directory (a ``Manifest.json`` with item entries)."""
    manifest = _manifest(source)
    if manifest is None:
        return None
    entries = manifest["itemInfoEntries"].values()
    authored = any(isinstance(e, dict) and "CoreML" in str(e.get("author", "")) for e in entries)
    return FORMAT if authored or source.path.rstrip("/").endswith(".mlpackage") else None


def describe_dir(source: DirSource) -> ModelDescription:
    """Describe an ``.mlpackage``: the root spec file plus the package's other items."""
    manifest = _manifest(source)
    if manifest is None or source.opener is None:
        raise ModelFormatError(source.path, "not an .mlpackage (no valid Manifest.json)")
    entries: dict[str, Any] = manifest["itemInfoEntries"]
    root_id = manifest.get("rootModelIdentifier")
    root = entries.get(root_id) if isinstance(root_id, str) else None
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise ModelFormatError(source.path, "Manifest.json names no root model")
    spec = posixpath.normpath(posixpath.join("Data", root["path"]))
    if spec.startswith(".."):
        raise ModelFormatError(source.path, f"root model path {root['path']!r} escapes the package")
    with source.opener(source.sibling(spec), "rb") as f:
        desc = describe(f, Source(source.sibling(spec)))
    desc.metadata["package_version"] = manifest.get("fileFormatVersion")
    desc.metadata["spec_path"] = spec
    for key, entry in entries.items():
        if key == root_id or not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        path = posixpath.normpath(posixpath.join("Data", entry["path"]))
        if not path.startswith(".."):
            desc.external_data.append(path)
    return desc


def _sub(data: bytes, offset: int, length: int) -> bytes:
    return data[offset : offset + length]


def _feature(data: bytes, what: str) -> TensorInfo:
    name, dtype, shape = "", "unknown", ()
    for fld in iter_fields_bytes(data, what):
        if fld.number == 1 and fld.wire == LEN:
            name = _sub(data, fld.offset, fld.length).decode("utf-8", "replace")
        elif fld.number == 3 and fld.wire == LEN:
            ftype = _sub(data, fld.offset, fld.length)
            for kind in iter_fields_bytes(ftype, what):
                if kind.number not in _FEATURE_KINDS or kind.wire != LEN:
                    continue
                dtype = _FEATURE_KINDS[kind.number]
                body = _sub(ftype, kind.offset, kind.length)
                if kind.number == 5:
                    dtype, shape = _array_type(body, what)
                elif kind.number == 4:
                    dims = {f.number: f.value for f in iter_fields_bytes(body, what)
                            if f.wire == VARINT}  # fmt: skip
                    shape = (dims.get(2, 0), dims.get(1, 0))
    return TensorInfo(name, dtype, shape)


def _array_type(body: bytes, what: str) -> tuple[str, tuple[int, ...]]:
    dtype, shape = "float32", []
    for f in iter_fields_bytes(body, what):
        if f.number == 1 and f.wire == VARINT:
            shape.append(f.value)
        elif f.number == 1 and f.wire == LEN:
            shape.extend(packed_varints(_sub(body, f.offset, f.length)))
        elif f.number == 2 and f.wire == VARINT:
            dtype = _ARRAY_DTYPES.get(f.value, f"array_type_{f.value}")
    return dtype, tuple(shape)


def _metadata(data: bytes, what: str) -> dict[str, Any]:
    names = {1: "short_description", 2: "version", 3: "author", 4: "license"}
    out: dict[str, Any] = {}
    user: dict[str, str] = {}
    for f in iter_fields_bytes(data, what):
        if f.wire != LEN:
            continue
        value = _sub(data, f.offset, f.length)
        if f.number in names:
            out[names[f.number]] = value.decode("utf-8", "replace")
        elif f.number == 100:
            entry = {e.number: _sub(value, e.offset, e.length).decode("utf-8", "replace")
                     for e in iter_fields_bytes(value, what) if e.wire == LEN}  # fmt: skip
            user[entry.get(1, "")] = entry.get(2, "")
    if user:
        out["user_defined"] = user
    return out


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe a Core ML ``Model`` protobuf: spec version, model type, features, metadata."""
    what = source.path
    reader = BlockReader(f, what)
    desc = ModelDescription(format=FORMAT, framework="coreml")
    meta: dict[str, Any] = {}
    for fld in iter_fields(reader, 0, reader.size):
        if fld.number == 1 and fld.wire == VARINT:
            meta["specification_version"] = fld.value
        elif fld.number == 10 and fld.wire == VARINT:
            meta["is_updatable"] = bool(fld.value)
        elif fld.number == 2 and fld.wire == LEN:
            if fld.length > _MAX_DESCRIPTION:
                raise ModelFormatError(what, "Core ML model description is too large")
            data = reader.read_at(fld.offset, fld.length, "Core ML description")
            for sub in iter_fields_bytes(data, what):
                if sub.wire != LEN:
                    continue
                body = _sub(data, sub.offset, sub.length)
                if sub.number == 1:
                    desc.inputs.append(_feature(body, what))
                elif sub.number == 10:
                    desc.outputs.append(_feature(body, what))
                elif sub.number == 100:
                    meta.update(_metadata(body, what))
        elif fld.number >= 200 and fld.wire == LEN:
            meta["model_type"] = MODEL_TYPES.get(fld.number, f"type_{fld.number}")
        else:
            raise ModelFormatError(what, f"unexpected Core ML Model field {fld.number}")
    if "specification_version" not in meta:
        raise ModelFormatError(what, "Core ML model has no specificationVersion")
    desc.metadata = meta
    return desc
