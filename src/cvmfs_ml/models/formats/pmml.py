"""PMML (Predictive Model Markup Language, dmg.org PMML 4.x): an XML document rooted at ``<PMML>``.

Parsed with an incremental pull parser fed at most :data:`MAX_READ` bytes, stopping once the
first model element's ``MiningSchema`` has been read: the header (``version``, ``Header`` with
``Application``), the ``DataDictionary`` fields and the model element (``TreeModel``,
``MiningModel``, ``NeuralNetwork``, ...: ``functionName``, ``modelName``). ElementTree resolves
no external entities, and expat bounds entity expansion.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from cvmfs_ml.models.formats.base import (
    ModelDescription,
    ModelFormatError,
    Probe,
    ReadableFile,
    Source,
    TensorInfo,
)

__all__ = ["FORMAT", "MAX_READ", "describe", "detect"]

FORMAT = "pmml"
MAX_READ = 1 << 20
_NOT_MODELS = frozenset({
    "Header", "DataDictionary", "TransformationDictionary", "MiningBuildTask", "Extension",
    "MiningSchema", "Output", "Targets", "LocalTransformations", "ModelStats", "ModelExplanation",
    "ModelVerification",
})  # fmt: skip


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def detect(probe: Probe) -> str | None:
    """``"pmml"`` when the document's root element is ``PMML`` (any namespace)."""
    head = probe.head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"<"):
        return None
    parser = ET.XMLPullParser(events=("start",))
    try:
        parser.feed(head)
        for _event, elem in parser.read_events():
            return FORMAT if _local(elem.tag) == "PMML" else None
    except ET.ParseError:
        return None
    return None


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe a PMML document from its first :data:`MAX_READ` bytes."""
    what = source.path
    f.seek(0)
    parser = ET.XMLPullParser(events=("start", "end"))
    desc = ModelDescription(format=FORMAT)
    meta: dict[str, Any] = {}
    fields: dict[str, str] = {}
    mining: list[tuple[str, str]] = []
    depth = 0
    model_depth: int | None = None
    done = False
    read = 0
    try:
        while not done and read < MAX_READ:
            chunk = f.read(min(1 << 16, MAX_READ - read))
            if not chunk:
                break
            read += len(chunk)
            parser.feed(chunk)
            for event, elem in parser.read_events():
                tag = _local(elem.tag)
                if event == "start":
                    depth += 1
                    if depth == 1:
                        if tag != "PMML":
                            raise ModelFormatError(what, f"root element is <{tag}>, not <PMML>")
                        meta["version"] = elem.get("version")
                        meta["namespace"] = elem.tag[1:].partition("}")[0] or None
                    elif depth == 2 and model_depth is None and tag not in _NOT_MODELS:
                        model_depth = depth
                        meta["model_type"] = tag
                        for attr in ("functionName", "modelName", "algorithmName"):
                            if elem.get(attr) is not None:
                                meta[_snake(attr)] = elem.get(attr)
                    continue
                depth -= 1
                if tag == "Application" and depth == 2:
                    meta["application"] = elem.get("name")
                    meta["application_version"] = elem.get("version")
                elif tag == "Header" and depth == 1:
                    for attr in ("copyright", "description"):
                        if elem.get(attr):
                            meta[attr] = elem.get(attr)
                elif tag == "DataField":
                    fields[elem.get("name") or ""] = elem.get("dataType") or "unknown"
                    elem.clear()
                elif tag == "MiningField" and model_depth is not None and depth == model_depth + 1:
                    mining.append((elem.get("name") or "", elem.get("usageType") or "active"))
                elif tag == "MiningSchema" and model_depth is not None and depth == model_depth:
                    done = True
                    break
    except ET.ParseError as exc:
        raise ModelFormatError(what, f"malformed PMML XML: {exc}") from None
    if "version" not in meta:
        raise ModelFormatError(what, "no <PMML> root element")
    meta["data_fields"] = len(fields)
    desc.metadata = meta
    desc.framework = meta.get("application")
    for name, usage in mining:
        info = TensorInfo(name, fields.get(name, "unknown"), ())
        if usage in ("target", "predicted"):
            desc.outputs.append(info)
        elif usage == "active":
            desc.inputs.append(info)
    if "model_type" not in meta:
        desc.warnings.append(f"no model element in the first {read} bytes")
    return desc


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)
