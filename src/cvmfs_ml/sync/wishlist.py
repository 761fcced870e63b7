"""The sync wishlist: DUCC's v1 YAML recipe as it is, plus a ``models:`` section.

DUCC's keys (``ducc/lib/recipe.go``, ``YamlRecipeV1``) are taken unchanged, so an existing
wishlist works as it is::

    version: 1
    name: physics                  # ours, optional: who published what (see below)
    user: cvmfsunpacker            # thin-image pusher: accepted, not used (no thin images)
    cvmfs_repo: unpacked.cern.ch   # checked against the repository synced into
    output_format: '$(scheme)://registry.example/thin/$(image)'   # accepted, not used
    input:
      - 'https://registry.hub.docker.com/library/fedora:latest'
      - 'https://registry.hub.docker.com/atlas/analysisbase:21.2.1*'   # '*' in tags only

``models:`` maps sources to ``NAMESPACE/NAME``::

    models:
      - source: oci://REGISTRY/REPOSITORY:TAG-PATTERN   # each matching tag is a version
        name: hep/tagger
        aliases: [latest, prod]                         # tags that move our aliases instead
      - source: mlflow://HOST:PORT/MODEL-NAME           # MLflow versions, aliases follow
        name: hep/regressor
      - source: /path/to/folder                         # a local (Hugging Face-style) folder
        name: hep/bert
        version: v1

``name`` is what the images it publishes record as their owner (``image.json``), so it removes
them when they leave it, and no other wishlist does; it goes with the file when the file is
moved or renamed. Without one, the owner is the file's path, as before names existed: a named
wishlist takes over the records of its own path.

Every problem is one :class:`~cvmfs_ml.errors.ConfigError` line naming the entry and what is
wrong, raised before anything is contacted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvmfs_ml.errors import ConfigError, FormatError
from cvmfs_ml.models.layout import ALIAS_LATEST, ModelRef, validate_component
from cvmfs_ml.models.sources.oci_client import OciReference

__all__ = ["ImageSpec", "ModelSpec", "Wishlist", "load_wishlist", "parse_wishlist"]

MAX_WISHLIST_BYTES = 4 * 2**20
_DUCC_KEYS = {"version", "name", "user", "cvmfs_repo", "output_format", "input", "models", "layers"}
_MODEL_KEYS = {"source", "name", "aliases", "version", "platform", "subpath", "tracking_uri"}
_TAG_PATTERN_RE = re.compile(r"[A-Za-z0-9_*][A-Za-z0-9._*-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # never a path: paths were owners


@dataclass(frozen=True)
class ImageSpec:
    """One ``input`` line: a registry repository and a tag (``*`` allowed) or a digest."""

    text: str
    registry: str
    repository: str
    tag_pattern: str | None
    digest: str | None
    plain_http: bool | None  # None: no scheme given, the caller's default applies

    @property
    def wildcard(self) -> bool:
        return self.tag_pattern is not None and "*" in self.tag_pattern

    def matches(self, tag: str) -> bool:
        """DUCC's wildcard: ``*`` stands for any run of characters, nothing else is special."""
        assert self.tag_pattern is not None
        regex = ".*".join(re.escape(part) for part in self.tag_pattern.split("*"))
        return re.fullmatch(regex, tag) is not None

    def reference(self, tag: str | None = None) -> OciReference:
        return OciReference(self.registry, self.repository, tag or self.tag_pattern, self.digest)


@dataclass(frozen=True)
class ModelSpec:
    """One ``models:`` entry."""

    kind: str  # "oci", "mlflow" or "folder"
    source: str
    ref: ModelRef  # namespace/name, no version
    aliases: tuple[str, ...] = ()
    version: str | None = None
    image: ImageSpec | None = None  # kind == "oci"
    tracking_uri: str | None = None  # kind == "mlflow"
    registered_model: str | None = None  # kind == "mlflow"
    platform: str = "linux/amd64"
    subpath: str = ""


@dataclass
class Wishlist:
    version: int
    user: str = ""
    cvmfs_repo: str = ""
    output_format: str = ""
    images: list[ImageSpec] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    origin: str = "wishlist"  # names the wishlist in image.json: each removes only its own
    layers: bool = False  # also DUCC's /.layers/ and podman's store (sync/layers.py)
    former_origin: str = ""  # a named wishlist's path: the owner its records had before

    def owns(self, owner: str) -> bool:
        """Whether an ``image.json`` of ``owner`` is this wishlist's (to remove when unwanted)."""
        return owner == self.origin or (bool(self.former_origin) and owner == self.former_origin)


def parse_image(text: str, what: str = "image") -> ImageSpec:
    """``[scheme://]REGISTRY/REPOSITORY[:TAG][@DIGEST]`` with ``*`` allowed in the tag."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what}: expected an image reference string, got {text!r}")
    rest = text.strip()
    plain_http: bool | None = None
    scheme, sep, after = rest.partition("://")
    if sep:
        if scheme not in ("http", "https", "oci", "docker"):
            raise ConfigError(f"{what}: {text!r}: unknown scheme {scheme!r}")
        plain_http = {"http": True, "https": False}.get(scheme)
        rest = after
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
    head, _, last = rest.rpartition("/")
    tag = None
    if ":" in last:
        last, tag = last.split(":", 1)
        rest = f"{head}/{last}" if head else last
        if _TAG_PATTERN_RE.fullmatch(tag) is None:
            raise ConfigError(f"{what}: {text!r}: invalid tag {tag!r}")
    if "*" in rest:
        raise ConfigError(f"{what}: {text!r}: '*' is allowed in the tag only")
    if "/" not in rest:
        raise ConfigError(f"{what}: {text!r}: expected REGISTRY/REPOSITORY[:TAG]")
    try:
        parsed = OciReference.parse(rest + (f"@{digest}" if digest else ""))
    except FormatError as exc:
        raise ConfigError(f"{what}: {exc.reason}") from exc
    if tag is None and digest is None:
        tag = "latest"
    if tag is not None and "*" in tag and digest is not None:
        raise ConfigError(f"{what}: {text!r}: a wildcard tag cannot be pinned to a digest")
    return ImageSpec(text, parsed.registry, parsed.repository, tag, digest, plain_http)


def _string_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what}: expected a list of names")
    return list(value)


def _parse_mlflow(source: str, what: str) -> tuple[str, str]:
    """``mlflow://HOST[:PORT][/PATH]/MODEL`` (``mlflow+https://`` for TLS) -> (URI, model)."""
    scheme, _, rest = source.partition("://")
    base, _, model = rest.rstrip("/").rpartition("/")
    if not base or not model:
        raise ConfigError(f"{what}: {source!r}: expected mlflow://HOST[:PORT]/MODEL-NAME")
    http = "https" if scheme == "mlflow+https" else "http"
    return f"{http}://{base}", model


def _parse_model(raw: Any, position: int) -> ModelSpec:
    what = f"models[{position}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a mapping with 'source' and 'name'")
    unknown = sorted(set(raw) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"{what}: unknown key {unknown[0]!r} (known: {sorted(_MODEL_KEYS)})")
    source, name = raw.get("source"), raw.get("name")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{what}: 'source' is missing")
    if not isinstance(name, str):
        raise ConfigError(f"{what}: 'name' is missing (NAMESPACE/NAME)")
    try:
        ref = ModelRef.parse(name)
        if ref.version is not None:
            raise ValueError(f"'name' {name!r} must not carry a version")
        aliases = _string_list(raw.get("aliases"), f"{what}.aliases")
        for alias in aliases:
            validate_component(alias, "alias", version=True)
        version = raw.get("version")
        if version is not None:
            validate_component(str(version), "version", version=True)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc
    common: dict[str, Any] = {
        "source": source.strip(),
        "ref": ref,
        "aliases": tuple(aliases),
        "version": str(version) if version is not None else None,
        "platform": str(raw.get("platform") or "linux/amd64"),
        "subpath": str(raw.get("subpath") or ""),
    }
    text = source.strip()
    if text.startswith(("mlflow://", "mlflow+http://", "mlflow+https://")):
        tracking, model = _parse_mlflow(text, what)
        return ModelSpec(
            kind="mlflow",
            tracking_uri=str(raw.get("tracking_uri") or tracking),
            registered_model=model,
            **common,
        )
    if "://" in text and not text.startswith(("oci://", "http://", "https://", "docker://")):
        raise ConfigError(f"{what}: {text!r}: unknown source scheme")
    if "://" in text:
        image = parse_image(text, what)
        if image.digest is not None and version is None:
            raise ConfigError(f"{what}: a source pinned by digest needs 'version'")
        if image.tag_pattern == ALIAS_LATEST and version is None:
            raise ConfigError(
                f"{what}: tag 'latest' cannot be a version name: give 'version' or a tag pattern"
            )
        return ModelSpec(kind="oci", image=image, **common)
    if version is None:
        raise ConfigError(f"{what}: a folder source needs 'version'")
    return ModelSpec(kind="folder", **common)


def parse_wishlist(text: str, what: str = "wishlist") -> Wishlist:
    """Parse and check a wishlist; :class:`ConfigError` naming the first problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a YAML mapping with 'version' and 'input'")
    unknown = sorted(set(raw) - _DUCC_KEYS)
    if unknown:
        raise ConfigError(f"{what}: unknown key {unknown[0]!r} (known: {sorted(_DUCC_KEYS)})")
    if raw.get("version") != 1:
        raise ConfigError(f"{what}: 'version' must be 1, got {raw.get('version')!r}")
    inputs = raw.get("input") or []
    if not isinstance(inputs, list):
        raise ConfigError(f"{what}: 'input' must be a list of image references")
    models = raw.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"{what}: 'models' must be a list")
    if not inputs and not models:
        raise ConfigError(f"{what}: nothing to sync: 'input' and 'models' are both empty")
    if not isinstance(raw.get("layers", False), bool):
        raise ConfigError(f"{what}: 'layers' must be true or false")
    for key in ("name", "user", "cvmfs_repo", "output_format"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{what}: {key!r} must be a string")
    name = raw.get("name")
    if name is not None and _NAME_RE.fullmatch(name) is None:
        raise ConfigError(
            f"{what}: 'name' {name!r}: expected 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    wishlist = Wishlist(
        version=1,
        user=raw.get("user") or "",
        cvmfs_repo=raw.get("cvmfs_repo") or "",
        output_format=raw.get("output_format") or "",
        images=[parse_image(item, f"input[{i}]") for i, item in enumerate(inputs)],
        models=[_parse_model(item, i) for i, item in enumerate(models)],
        origin=name or what,
        layers=bool(raw.get("layers", False)),
        former_origin=what if name else "",
    )
    names = [m.ref.key for m in wishlist.models]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"{what}: two 'models' entries publish {duplicate}")
    return wishlist


def load_wishlist(path: Path) -> Wishlist:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_WISHLIST_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_WISHLIST_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the wishlist: {exc.strerror or exc}") from exc
    return parse_wishlist(text, str(path.resolve()))
