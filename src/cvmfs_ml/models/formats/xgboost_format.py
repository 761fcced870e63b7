"""XGBoost models saved as JSON or UBJSON (``Booster.save_model("m.json" / "m.ubj")``).

Both encode the same document (XGBoost ``doc/json-schema.rst``): ``{"learner": {...,
"gradient_booster": {"model": {"gbtree_model_param": {"num_trees": ...}, "trees": [...]},
"name": "gbtree"}, "learner_model_param": {...}, "objective": {"name": ...}}, "version": [2, 1,
0]}``, keys sorted. The UBJSON writer (``src/common/json.cc``, ``UBJWriter``) uses ``L`` (int64,
big-endian) string lengths, ``[#L`` counted arrays and ``[$<type>#L`` typed arrays for the tree
vectors; our reader skips typed arrays by offset and stops after :data:`MAX_VALUES` values. JSON
files up to :data:`MAX_JSON` are parsed whole; larger ones are described from their first and
last 64 KiB only.
"""

from __future__ import annotations

import json
import re
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
)

__all__ = ["FORMAT", "MAX_JSON", "MAX_VALUES", "describe", "detect"]

FORMAT = "xgboost"
MAX_JSON = 64 << 20
MAX_VALUES = 5_000_000
_JSON_START = re.compile(rb'\A\s*\{\s*"(learner|version)"\s*:')
_UBJ_INT = {b"i": ">b", b"U": ">B", b"I": ">h", b"l": ">i", b"L": ">q"}
_UBJ_SCALAR = {**_UBJ_INT, b"d": ">f", b"D": ">d", b"C": ">c"}
_KEYS = (b"learner", b"version")
_INLINE_ARRAY = 64


def _ubj_key_at(head: bytes, pos: int) -> bytes | None:
    marker = head[pos : pos + 1]
    if marker not in _UBJ_INT:
        return None
    fmt = _UBJ_INT[marker]
    size = struct.calcsize(fmt)
    if len(head) < pos + 1 + size:
        return None
    (n,) = struct.unpack(fmt, head[pos + 1 : pos + 1 + size])
    return head[pos + 1 + size : pos + 1 + size + n] if 0 < n < 64 else None


def detect(probe: Probe) -> str | None:
    """``"xgboost"`` for a JSON or UBJSON document whose first key is ``learner``/``version``."""
    head = probe.head
    if _JSON_START.match(head) and b'"learner"' in head:
        return FORMAT
    if head[:1] == b"{" and _ubj_key_at(head, 1) in _KEYS:
        return FORMAT
    return None


class _UBJReader:
    def __init__(self, reader: BlockReader) -> None:
        self.r = reader
        self.pos = 0
        self.values = 0

    def take(self, n: int) -> bytes:
        data = self.r.read_at(self.pos, n, "UBJSON")
        self.pos += n
        return data

    def marker(self) -> bytes:
        m = self.take(1)
        while m == b"N":  # no-op
            m = self.take(1)
        return m

    def integer(self, marker: bytes) -> int:
        if marker not in _UBJ_INT:
            raise ModelFormatError(
                self.r.what, f"UBJSON: expected an integer marker, got {marker!r}"
            )
        fmt = _UBJ_INT[marker]
        return int(struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0])

    def string(self) -> str:
        n = self.integer(self.marker())
        if n < 0 or self.pos + n > self.r.size:
            raise ModelFormatError(self.r.what, f"UBJSON: bad string length {n} at {self.pos}")
        raw = self.take(min(n, 4096))
        self.pos += n - len(raw)
        return raw.decode("utf-8", errors="replace")

    def value(self, marker: bytes | None = None, depth: int = 0) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _Budget
        if depth > 64:
            raise ModelFormatError(self.r.what, "UBJSON nested too deeply")
        m = marker or self.marker()
        if m in _UBJ_SCALAR:
            fmt = _UBJ_SCALAR[m]
            v = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
            return v.decode("latin1") if isinstance(v, bytes) else v
        if m == b"S" or m == b"H":
            return self.string()
        if m in (b"T", b"F"):
            return m == b"T"
        if m == b"Z":
            return None
        if m == b"[":
            return self.container(depth, array=True)
        if m == b"{":
            return self.container(depth, array=False)
        raise ModelFormatError(self.r.what, f"UBJSON: unknown marker {m!r} at byte {self.pos - 1}")

    def container(self, depth: int, *, array: bool) -> Any:
        elem_type: bytes | None = None
        count: int | None = None
        m: bytes | None = self.marker()
        if m == b"$":
            elem_type = self.take(1)
            m = self.marker()
            if m != b"#":
                raise ModelFormatError(self.r.what, "UBJSON: typed container without a count")
        if m == b"#":
            count = self.integer(self.marker())
            if count < 0 or count > self.r.size:
                raise ModelFormatError(self.r.what, f"UBJSON: bad container count {count}")
            m = None
        if array and count is not None and elem_type in _UBJ_SCALAR and count > _INLINE_ARRAY:
            end = self.pos + count * struct.calcsize(_UBJ_SCALAR[elem_type])
            if end > self.r.size:
                raise ModelFormatError(self.r.what, "UBJSON: typed array runs past end of file")
            self.pos = end
            return {"length": count}
        close = b"]" if array else b"}"
        items: Any = [] if array else {}
        n = 0
        while True:
            if count is None:
                m = m or self.marker()
                if m == close:
                    break
            elif n >= count:
                break
            if array:
                value = self.value(elem_type or m, depth + 1)
                if n < _INLINE_ARRAY:
                    items.append(value)
            else:
                # Object keys carry no "S" marker: m (or the next byte) is the length's marker.
                key = self.take(self.integer(m or self.marker())).decode("utf-8", "replace")
                items[key] = self.value(elem_type, depth + 1)
            m = None
            n += 1
        if array and n > _INLINE_ARRAY:
            return {"length": n}
        return items


class _Budget(Exception):
    pass


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _length(value: Any) -> int:
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict) and isinstance(value.get("length"), int):
        return int(value["length"])
    return 0


def _summarize(doc: dict[str, Any], desc: ModelDescription) -> None:
    learner = _get(doc, "learner") or {}
    booster = _get(learner, "gradient_booster") or {}
    model = _get(booster, "model") or _get(booster, "gbtree", "model") or {}
    params = _get(model, "gbtree_model_param") or {}
    lmp = _get(learner, "learner_model_param") or {}
    trees = _get(model, "trees")
    version = doc.get("version")
    meta: dict[str, Any] = {
        "version": ".".join(str(v) for v in version) if isinstance(version, list) else None,
        "booster": _get(booster, "name"),
        "objective": _get(learner, "objective", "name"),
        "num_trees": _int(params.get("num_trees")) if isinstance(params, dict) else None,
        "num_feature": _int(lmp.get("num_feature")) if isinstance(lmp, dict) else None,
        "num_class": _int(lmp.get("num_class")) if isinstance(lmp, dict) else None,
        "num_target": _int(lmp.get("num_target")) if isinstance(lmp, dict) else None,
    }
    if isinstance(trees, list) and trees and all(isinstance(t, dict) for t in trees):
        meta["num_nodes"] = sum(_length(t.get("left_children")) for t in trees)
    names = _get(learner, "feature_names")
    if isinstance(names, list) and names:
        meta["feature_names"] = names[:_INLINE_ARRAY]
    desc.metadata.update(meta)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe an XGBoost JSON/UBJSON model: version, booster, objective, trees, features."""
    what = source.path
    reader = BlockReader(f, what)
    head = reader.read_at(0, min(reader.size, 64))
    desc = ModelDescription(format=FORMAT, framework="xgboost")
    if head[:1] == b"{" and _ubj_key_at(head, 1) in _KEYS:
        desc.metadata["encoding"] = "ubj"
        ubj = _UBJReader(reader)
        try:
            doc = ubj.value()
        except _Budget:
            desc.warnings.append(f"stopped after {MAX_VALUES} values: summary incomplete")
            return desc
        if not isinstance(doc, dict):
            raise ModelFormatError(what, "UBJSON document is not an object")
        _summarize(doc, desc)
        return desc
    desc.metadata["encoding"] = "json"
    if reader.size <= MAX_JSON:
        try:
            doc = jsontext.loads(reader.read_at(0, reader.size, "JSON"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(what, f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or "learner" not in doc:
            raise ModelFormatError(what, 'JSON document has no "learner" object')
        _summarize(doc, desc)
        return desc
    _summarize_large_json(reader, desc)
    return desc


def _summarize_large_json(reader: BlockReader, desc: ModelDescription) -> None:
    edge = 1 << 16
    head = reader.read_at(0, edge).decode("utf-8", "replace")
    tail = reader.read_at(reader.size - edge, edge).decode("utf-8", "replace")
    text = head + "\n" + tail

    def find(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    version = re.search(r'"version"\s*:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]', tail)
    desc.metadata.update({
        "version": ".".join(version.groups()) if version else None,
        "num_trees": _int(find(r'"num_trees"\s*:\s*"?(\d+)')),
        "num_feature": _int(find(r'"num_feature"\s*:\s*"?(\d+)')),
        "num_class": _int(find(r'"num_class"\s*:\s*"?(\d+)')),
        "objective": find(r'"objective"\s*:\s*\{[^{}]*?"name"\s*:\s*"([^"]+)"'),
    })  # fmt: skip
    desc.warnings.append("large JSON model: summarised from its first and last 64 KiB")
