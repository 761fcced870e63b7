"""Where models live in a repository, and the two JSON documents that describe them.

A model version is a directory that never changes once published; everything a reader needs to
find it is in the tree itself, so a plain ``ls /cvmfs/<repo>/`` works without any of our code::

    /<namespace>/<name>/<version>/          the model files; a nested catalog of its own
    /<namespace>/<name>/<version>/model.json
    /<namespace>/<name>/<alias> -> <version>  relative symlinks: ``latest`` and user aliases
    /.cvmfs-ml/index.json                   every model, version and alias in one document

One nested catalog per version keeps a client that opens one model from downloading the catalogs
of all the others, and lets a version be removed by dropping one catalog reference.

``model.json`` (schema ``cvmfs-ml.model/1``), written once with the version::

    {
      "schema": "cvmfs-ml.model/1",
      "namespace": "hep", "name": "particle-transformer", "version": "1.0",
      "format": "onnx",            # format of the largest recognised model file, or null
      "description": "...",
      "license": "apache-2.0",     # SPDX id or free text, or null
      "created": "2026-05-04T12:00:00Z",
      "published_by": "alice@host",
      "source": {"type": "local" | "huggingface" | "oci" | ..., ...},
      "size": 12345, "file_count": 3,
      "files": [{"path": "model.onnx", "size": 12345, "sha256": "<64 hex>"}, ...],
      "models": {"model.onnx": {"format": "onnx", "parameters": ..., "inputs": [...], ...}},
      "extra": {...},              # free-form, from the publisher (e.g. MLflow flavors)
      "warnings": [...]            # what the header parsers could not read
    }

``files`` lists every regular file of the version except ``model.json`` itself, sorted by path
(``/``-separated, relative to the version directory). ``models`` holds header-only descriptions
(:func:`cvmfs_ml.models.formats.describe_folder`) with large metadata values left out.

``/.cvmfs-ml/index.json`` (schema ``cvmfs-ml.index/1``) mirrors the tree so that listing a
repository costs one file, not a walk::

    {"schema": "cvmfs-ml.index/1", "updated": "...",
     "models": {"hep/particle-transformer": {
         "versions": {"1.0": {<model.json without files/models/extra>}},
         "aliases": {"latest": "1.0"}}}}

The tree is the truth: :func:`cvmfs_ml.models.tree.scan_models` rebuilds the index from it and
:func:`cvmfs_ml.models.tree.check_layout` lists every difference between the two. Unknown keys
are kept when a document is read and written back, so an older cvmfs-ml does not drop what a
newer one added.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError

__all__ = [
    "ALIAS_LATEST",
    "INDEX_PATH",
    "INDEX_SCHEMA",
    "MODEL_JSON",
    "MODEL_SCHEMA",
    "Index",
    "ModelEntry",
    "ModelFile",
    "ModelRecord",
    "ModelRef",
    "is_valid_name",
    "utc_timestamp",
    "validate_component",
]

MODEL_JSON = "model.json"
MODEL_SCHEMA = "cvmfs-ml.model/1"
INDEX_DIR = "/.cvmfs-ml"
INDEX_PATH = f"{INDEX_DIR}/index.json"
INDEX_SCHEMA = "cvmfs-ml.index/1"
ALIAS_LATEST = "latest"

# Namespaces and names: one safe path component that is never hidden (``.cvmfs-ml`` is ours)
# and never an option (``-x``). Versions and aliases also allow ``+`` (``1.0+cpu``); 128
# characters as in OCI tags.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

# Keys of model.json that the index does not repeat (they can be long).
_NOT_IN_INDEX = ("files", "models", "extra", "warnings", "schema", "namespace", "name", "version")
# What the index repeats of the rest is bounded too: a source says what it likes about itself
# (an OCI push's annotations and layer list, a description from a 4 MiB config blob), and one
# version made 800 kB of the index every listing reads. model.json keeps all of it.
_INDEX_TEXT = 1024  # characters of description, license, published_by
_INDEX_SOURCE = 4096  # bytes of the source as JSON
_INDEX_SOURCE_VALUE = 256  # bytes of one source value as JSON, when the whole is larger


def _json_size(value: Any) -> int:
    return len(json.dumps(value, default=str))


def validate_component(value: str, what: str, *, version: bool = False) -> str:
    """``value`` if it is a safe single path component for ``what``, else :class:`ValueError`.

    Safe means: no ``/``, not ``.``/``..``, not hidden, not starting with ``-``, ASCII letters,
    digits and ``._-`` (``+`` too for versions and aliases), at most 128 characters.
    """
    pattern = _VERSION_RE if version else _NAME_RE
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        allowed = "letters, digits and ._-" + ("+" if version else "")
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 {allowed}, starting with a letter or digit"
        )
    return value


def is_valid_name(value: str) -> bool:
    """Whether ``value`` is a namespace or model name :func:`validate_component` accepts."""
    return _NAME_RE.fullmatch(value) is not None


def utc_timestamp(when: dt.datetime | None = None) -> str:
    """``2026-05-04T12:00:00Z``: the one timestamp format of both documents."""
    when = when or dt.datetime.now(dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, order=True)
class ModelRef:
    """``namespace/name[:version]``; every part already validated as a safe path component.

    ``version`` may also name an alias (``hep/pt:latest``) when the reference is used to look a
    model up; :func:`resolve_version` turns it into the version it points to.
    """

    namespace: str
    name: str
    version: str | None = None

    def __post_init__(self) -> None:
        validate_component(self.namespace, "namespace")
        validate_component(self.name, "model name")
        if self.version is not None:
            validate_component(self.version, "version", version=True)

    @classmethod
    def parse(cls, text: str, *, require_version: bool = False) -> ModelRef:
        """Parse ``ns/name:version`` (or ``ns/name`` unless ``require_version``)."""
        base, sep, version = text.strip().partition(":")
        parts = base.split("/")
        if len(parts) != 2:
            raise ValueError(f"invalid model reference {text!r}: expected NAMESPACE/NAME:VERSION")
        if sep and not version:
            raise ValueError(f"invalid model reference {text!r}: empty version after ':'")
        if require_version and not version:
            raise ValueError(f"model reference {text!r} needs a version: NAMESPACE/NAME:VERSION")
        return cls(parts[0], parts[1], version or None)

    @property
    def key(self) -> str:
        """``namespace/name``: the key of the model in the index."""
        return f"{self.namespace}/{self.name}"

    @property
    def model_path(self) -> str:
        """``/namespace/name``: the folder holding the versions and aliases."""
        return f"/{self.namespace}/{self.name}"

    @property
    def path(self) -> str:
        """``/namespace/name/version``: the version folder (requires a version)."""
        return f"{self.model_path}/{self.require_version()}"

    @property
    def model_json_path(self) -> str:
        return f"{self.path}/{MODEL_JSON}"

    def alias_path(self, alias: str) -> str:
        return f"{self.model_path}/{validate_component(alias, 'alias', version=True)}"

    def require_version(self) -> str:
        if self.version is None:
            raise ValueError(f"model reference {self} needs a version")
        return self.version

    def with_version(self, version: str | None) -> ModelRef:
        return ModelRef(self.namespace, self.name, version)

    def __str__(self) -> str:
        return self.key + (f":{self.version}" if self.version else "")


@dataclass(frozen=True)
class ModelFile:
    """One regular file of a version: ``path`` relative to the version folder."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelFile:
        try:
            return cls(str(data["path"]), int(data["size"]), str(data["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(MODEL_JSON, f"bad file entry {data!r}") from exc


@dataclass
class ModelRecord:
    """One published version: the content of its ``model.json`` plus the aliases that name it.

    A record read from the index (:meth:`from_summary`) has empty ``files`` and ``models``; read
    ``model.json`` (:func:`read_record`) for those. ``aliases`` is not stored in ``model.json``
    (aliases move, the file is immutable): it is filled in from the tree or the index.
    """

    ref: ModelRef
    format: str | None = None
    description: str = ""
    license: str | None = None
    created: str = ""
    published_by: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    files: list[ModelFile] = field(default_factory=list)
    size: int = 0
    file_count: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    unknown: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ref.require_version()

    @property
    def path(self) -> str:
        return self.ref.path

    @property
    def version(self) -> str:
        return self.ref.require_version()

    def digests(self) -> dict[str, str]:
        """``{path: sha256}``: what makes two publications of a version the same."""
        return {f.path: f.sha256 for f in self.files}

    def to_json(self) -> dict[str, Any]:
        """The ``model.json`` document."""
        out: dict[str, Any] = dict(self.unknown)
        out.update(
            {
                "schema": MODEL_SCHEMA,
                "namespace": self.ref.namespace,
                "name": self.ref.name,
                "version": self.version,
                "format": self.format,
                "description": self.description,
                "license": self.license,
                "created": self.created,
                "published_by": self.published_by,
                "source": self.source,
                "size": self.size,
                "file_count": self.file_count,
                "files": [f.to_json() for f in self.files],
                "models": self.models,
                "extra": self.extra,
                "warnings": self.warnings,
            }
        )
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"

    def summary(self) -> dict[str, Any]:
        """The entry of this version in the index (``model.json`` minus the long parts): texts
        cut at :data:`_INDEX_TEXT` characters; a source larger than :data:`_INDEX_SOURCE` bytes
        keeps its short values, naming the others in ``omitted_from_index``."""
        out = {k: v for k, v in self.to_json().items() if k not in _NOT_IN_INDEX}
        for key in ("description", "license", "published_by"):
            text = out.get(key)
            if isinstance(text, str) and len(text) > _INDEX_TEXT:
                out[key] = text[: _INDEX_TEXT - 1] + "…"
        source = out.get("source")
        if isinstance(source, dict) and _json_size(source) > _INDEX_SOURCE:
            kept: dict[str, Any] = {}
            room = _INDEX_SOURCE
            for key, value in source.items():
                size = _json_size({key: value})
                if size <= _INDEX_SOURCE_VALUE and size <= room:
                    kept[key] = value
                    room -= size
            kept["omitted_from_index"] = sorted(k for k in source if k not in kept)
            out["source"] = kept
        return out

    def info(self) -> dict[str, Any]:
        """What ``model info --json`` prints: ``model.json`` plus ref, path and aliases."""
        out = self.to_json()
        out.update({"ref": str(self.ref), "path": self.path, "aliases": sorted(self.aliases)})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, what: str = MODEL_JSON) -> ModelRecord:
        schema = data.get("schema") if isinstance(data, Mapping) else None
        if not isinstance(schema, str) or not schema.startswith("cvmfs-ml.model/"):
            raise FormatError(what, f"not a cvmfs-ml model.json (schema {schema!r})")
        try:
            ref = ModelRef(str(data["namespace"]), str(data["name"]), str(data["version"]))
        except (KeyError, ValueError) as exc:
            raise FormatError(what, f"bad namespace/name/version: {exc}") from exc
        listed = data.get("files") or []
        if not isinstance(listed, list):
            raise FormatError(what, f"'files' is not a list but {type(listed).__name__}")
        files = [ModelFile.from_json(f) for f in listed]
        return cls._build(ref, data, files, what)

    @classmethod
    def from_summary(cls, ref: ModelRef, data: Mapping[str, Any]) -> ModelRecord:
        """A record from an index entry (no ``files``/``models``)."""
        return cls._build(ref, data, [], INDEX_PATH)

    @classmethod
    def _build(
        cls, ref: ModelRef, data: Mapping[str, Any], files: list[ModelFile], what: str
    ) -> ModelRecord:
        known = {
            "schema", "namespace", "name", "version", "format", "description", "license",
            "created", "published_by", "source", "size", "file_count", "files", "models",
            "extra", "warnings",
        }  # fmt: skip
        for key in ("format", "license", "published_by"):  # shown as text by every reader
            if data.get(key) is not None and not isinstance(data[key], str):
                raise FormatError(what, f"{key!r} of {ref} is not a string")
        try:
            return cls(
                ref=ref,
                format=data.get("format"),
                description=str(data.get("description") or ""),
                license=data.get("license"),
                created=str(data.get("created") or ""),
                published_by=data.get("published_by"),
                source=dict(data.get("source") or {}),
                files=files,
                size=int(data.get("size", sum(f.size for f in files))),
                file_count=int(data.get("file_count", len(files))),
                models=dict(data.get("models") or {}),
                extra=dict(data.get("extra") or {}),
                warnings=list(data.get("warnings") or []),
                unknown={k: v for k, v in data.items() if k not in known},
            )
        except (TypeError, ValueError) as exc:
            raise FormatError(what, f"bad model record for {ref}: {exc}") from exc


@dataclass
class ModelEntry:
    """One model in the index: its versions (summaries) and aliases (alias -> version)."""

    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.unknown)
        out["versions"] = {v: self.versions[v] for v in sorted(self.versions)}
        out["aliases"] = {a: self.aliases[a] for a in sorted(self.aliases)}
        return out


@dataclass
class Index:
    """``/.cvmfs-ml/index.json``: every model, keyed by ``namespace/name``.

    The mutators keep the two invariants readers rely on: every alias points at a listed
    version, and a model with no version left disappears.
    """

    models: dict[str, ModelEntry] = field(default_factory=dict)
    updated: str = ""
    unknown: dict[str, Any] = field(default_factory=dict)

    # -- codec --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out = dict(self.unknown)
        out.update(
            {
                "schema": INDEX_SCHEMA,
                "updated": self.updated,
                "models": {k: self.models[k].to_json() for k in sorted(self.models)},
            }
        )
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> Index:
        try:
            data = jsontext.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(INDEX_PATH, f"not JSON: {exc}") from exc
        schema = data.get("schema") if isinstance(data, dict) else None
        if not isinstance(schema, str) or not schema.startswith("cvmfs-ml.index/"):
            raise FormatError(INDEX_PATH, f"not a cvmfs-ml index (schema {schema!r})")
        models: dict[str, ModelEntry] = {}
        listed = data.get("models") or {}
        if not isinstance(listed, dict):
            raise FormatError(INDEX_PATH, "'models' is not an object")
        for key, value in listed.items():
            versions = value.get("versions") or {} if isinstance(value, dict) else None
            aliases = value.get("aliases") or {} if isinstance(value, dict) else None
            if (
                not isinstance(versions, dict)
                or not isinstance(aliases, dict)
                or not all(isinstance(s, dict) for s in versions.values())
            ):
                raise FormatError(INDEX_PATH, f"bad entry for {key!r}")
            namespace, _, name = str(key).partition("/")
            try:
                ModelRef(namespace, name)  # each a valid component, as readers split the key
                for label in (*versions, *aliases, *aliases.values()):
                    validate_component(label, "version or alias", version=True)
            except ValueError as exc:
                raise FormatError(INDEX_PATH, f"bad entry for {key!r}: {exc}") from exc
            models[key] = ModelEntry(
                versions={str(v): dict(s) for v, s in versions.items()},
                aliases={str(a): str(v) for a, v in aliases.items()},
                unknown={k: v for k, v in value.items() if k not in ("versions", "aliases")},
            )
        unknown = {k: v for k, v in data.items() if k not in ("schema", "updated", "models")}
        return cls(models, str(data.get("updated") or ""), unknown)

    # -- queries ------------------------------------------------------------------------------
    def records(self) -> list[ModelRecord]:
        """Every version as a summary record (with its aliases), sorted by ref."""
        out = []
        for key, entry in self.models.items():
            namespace, name = key.split("/", 1)
            for version, summary in entry.versions.items():
                record = ModelRecord.from_summary(ModelRef(namespace, name, version), summary)
                record.aliases = sorted(a for a, v in entry.aliases.items() if v == version)
                out.append(record)
        return sorted(out, key=lambda r: r.ref)

    # -- changes ------------------------------------------------------------------------------
    def add(self, record: ModelRecord, aliases: Iterable[str] = ()) -> None:
        entry = self.models.setdefault(record.ref.key, ModelEntry())
        entry.versions[record.version] = record.summary()
        for alias in aliases:
            entry.aliases[alias] = record.version

    def remove(self, ref: ModelRef) -> None:
        """Drop a version and every alias pointing at it (and the model if none is left)."""
        entry = self.models.get(ref.key)
        if entry is None:
            return
        entry.versions.pop(ref.require_version(), None)
        entry.aliases = {a: v for a, v in entry.aliases.items() if v != ref.version}
        if not entry.versions:
            del self.models[ref.key]

    def set_alias(self, ref: ModelRef, alias: str) -> None:
        self.models[ref.key].aliases[alias] = ref.require_version()

    def remove_alias(self, ref: ModelRef, alias: str) -> None:
        entry = self.models.get(ref.key)
        if entry is not None:
            entry.aliases.pop(alias, None)
