"""Reading the model tree of a repository: the index, versions, aliases, and their checks.

Everything here reads through :class:`TreeReader` (a client
:class:`~cvmfs_ml.client.repository.Repository`, or anything with its four methods), so the
same code serves a client over HTTP, a local folder and the publisher's view of its own
repository. The layout itself is in :mod:`cvmfs_ml.models.layout`.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Protocol

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError, NotFoundError
from cvmfs_ml.models.layout import (
    ALIAS_LATEST,
    INDEX_PATH,
    MODEL_JSON,
    Index,
    ModelEntry,
    ModelRecord,
    ModelRef,
    is_valid_name,
)

__all__ = [
    "MAX_INDEX_BYTES",
    "MAX_MODEL_JSON_BYTES",
    "REINDEX_HINT",
    "TreeReader",
    "check_layout",
    "missing_version",
    "read_bounded",
    "read_index",
    "read_record",
    "resolve_version",
    "scan_models",
    "stat_or_none",
]


#: The largest ``/.cvmfs-ml/index.json`` a reader loads: about 100,000 versions' summaries. The
#: repository is anyone's: a bigger one is refused from its catalog entry, before any byte is
#: fetched, and readers rebuild the list from the tree instead.
MAX_INDEX_BYTES = 64 * 2**20
#: The largest ``model.json`` a reader loads: a file list of about 100,000 files.
MAX_MODEL_JSON_BYTES = 16 * 2**20
#: What to do about an index that does not read (the tree is the truth, see :func:`scan_models`).
REINDEX_HINT = "repair it with `cvmfs-ml model reindex REPO`"


class TreeReader(Protocol):
    """What the readers below need of :class:`cvmfs_ml.client.repository.Repository`."""

    def stat(self, path: str) -> Any: ...

    def resolve(self, path: str) -> Any: ...

    def listdir(self, path: str = "") -> list[Any]: ...

    def read_bytes(self, path: str) -> bytes: ...

    def readlink(self, path: str) -> str: ...


def _exists(repo: TreeReader, path: str) -> bool:
    try:
        repo.stat(path)
        return True
    except FileNotFoundError:  # NotFoundError is one
        return False


def read_bounded(repo: TreeReader, path: str, limit: int, advice: str) -> bytes:
    """The bytes of the file at ``path`` (links followed), refused with a :class:`FormatError`
    ending in ``advice`` when its catalog entry says more than ``limit`` bytes: nothing is
    fetched then. The client checks the bytes it fetches against the entry's size and hash."""
    entry = repo.resolve(path)
    if entry.size > limit:
        raise FormatError(path, f"{entry.size} bytes, more than the {limit} a reader loads; "
                                f"{advice}")  # fmt: skip
    return repo.read_bytes(entry.path)


def read_index(repo: TreeReader) -> Index:
    """The repository's index, or an empty one if no model was ever published.

    An index over :data:`MAX_INDEX_BYTES` is a :class:`FormatError`, as one that does not parse."""
    if not _exists(repo, INDEX_PATH):
        return Index()
    advice = "not an index cvmfs-ml writes"
    return Index.from_bytes(read_bounded(repo, INDEX_PATH, MAX_INDEX_BYTES, advice))


def missing_version(ref: ModelRef, names: list[str], where: str = "") -> NotFoundError:
    """The error for a version or alias that ``ref``'s model lacks, naming what it has."""
    what = f"model version or alias {ref}"
    listed = ", ".join(sorted(names))
    if not names:
        return NotFoundError(what, where)
    if where:
        return NotFoundError(what, f"{where}, where {ref.key} has {listed}")
    return NotFoundError(what, f"{ref.key}, which has {listed}")


def resolve_version(repo: TreeReader, ref: ModelRef) -> ModelRef:
    """``ref`` with its version resolved: an alias is followed, a missing version means
    ``latest`` (or, without a ``latest`` alias, the most recently created version)."""
    if ref.version is None:
        if _exists(repo, ref.alias_path(ALIAS_LATEST)):
            ref = ref.with_version(ALIAS_LATEST)
        else:
            versions = _versions(repo, ref)
            if not versions:
                raise NotFoundError(f"model {ref.key}")
            newest = max(versions, key=lambda v: (versions[v].created, v))
            return ref.with_version(newest)
    entry = stat_or_none(repo, ref.path)
    if entry is None:  # say what there is: the user mistyped a version or an alias
        here = repo.listdir(ref.model_path) if _exists(repo, ref.model_path) else []
        raise missing_version(ref, [posixpath.basename(e.path) for e in here])
    if entry.is_symlink:
        target = repo.readlink(ref.path)
        if "/" in target:
            raise FormatError(ref.path, f"alias target {target!r} is not a sibling version")
        ref = ref.with_version(target)
    return ref


def stat_or_none(repo: TreeReader, path: str) -> Any:
    """The entry at ``path``, or ``None`` where there is none."""
    try:
        return repo.stat(path)
    except FileNotFoundError:
        return None


def read_record(repo: TreeReader, ref: ModelRef) -> ModelRecord:
    """The ``model.json`` of ``ref`` (an alias or no version resolves first), with its aliases."""
    ref = resolve_version(repo, ref)
    try:
        advice = "not a model.json cvmfs-ml writes; ask the repository's publisher"
        raw = read_bounded(repo, ref.model_json_path, MAX_MODEL_JSON_BYTES, advice)
    except FileNotFoundError as exc:
        raise NotFoundError(ref.model_json_path) from exc
    try:
        record = ModelRecord.from_json(jsontext.loads(raw), what=ref.model_json_path)
    except json.JSONDecodeError as exc:
        raise FormatError(ref.model_json_path, f"not JSON: {exc}") from exc
    if record.ref != ref:
        raise FormatError(ref.model_json_path, f"describes {record.ref}, not {ref}")
    record.aliases = sorted(a for a, v in _aliases(repo, ref).items() if v == ref.version)
    return record


def _aliases(repo: TreeReader, ref: ModelRef) -> dict[str, str]:
    out = {}
    for entry in repo.listdir(ref.model_path):
        if entry.is_symlink:
            out[posixpath.basename(entry.path)] = repo.readlink(entry.path)
    return out


def _versions(repo: TreeReader, ref: ModelRef) -> dict[str, ModelRecord]:
    if not _exists(repo, ref.model_path):
        return {}
    out = {}
    for entry in repo.listdir(ref.model_path):
        name = posixpath.basename(entry.path)
        if entry.is_dir and _exists(repo, f"{entry.path}/{MODEL_JSON}"):
            out[name] = read_record(repo, ref.with_version(name))
    return out


def scan_models(repo: TreeReader) -> Index:
    """Rebuild the index from the tree: every ``/<ns>/<name>/<version>/model.json`` and every
    alias symlink beside the versions (other content of the repository is ignored)."""
    index = Index()
    for top in repo.listdir(""):
        namespace = posixpath.basename(top.path)
        if not top.is_dir or not is_valid_name(namespace):
            continue
        for model in repo.listdir(top.path):
            name = posixpath.basename(model.path)
            if not model.is_dir or not is_valid_name(name):
                continue
            ref = ModelRef(namespace, name)
            versions = _versions(repo, ref)
            if not versions:
                continue
            entry = index.models.setdefault(ref.key, ModelEntry())
            for version, record in versions.items():
                entry.versions[version] = record.summary()
            entry.aliases = {a: v for a, v in _aliases(repo, ref).items() if v in versions}
    return index


def check_layout(repo: TreeReader) -> list[str]:
    """Every way the index and the tree disagree (empty when consistent).

    Checks: each indexed version has a ``model.json`` describing it, each version in the tree
    is indexed with the same summary, aliases match the symlinks, and no alias dangles.
    """
    problems: list[str] = []
    tree = scan_models(repo)
    try:
        index = read_index(repo)
    except FormatError as exc:  # nothing to compare with: the one problem is the index
        problems.append(f"{exc}; {REINDEX_HINT}")
        index = tree
    for key in sorted(set(index.models) | set(tree.models)):
        listed, found = index.models.get(key), tree.models.get(key)
        if listed is None:
            problems.append(f"{key}: in the tree but not in the index")
            continue
        if found is None:
            problems.append(f"{key}: in the index but has no version in the tree")
            continue
        for version in sorted(set(listed.versions) | set(found.versions)):
            if version not in found.versions:
                problems.append(f"{key}:{version}: indexed but missing from the tree")
            elif version not in listed.versions:
                problems.append(f"{key}:{version}: in the tree but not indexed")
            elif _bounded(key, version, listed.versions[version]) != found.versions[version]:
                problems.append(f"{key}:{version}: index entry differs from model.json")
        if listed.aliases != found.aliases:
            problems.append(f"{key}: aliases {listed.aliases} indexed, {found.aliases} in the tree")
    for key in sorted(tree.models):
        namespace, name = key.split("/", 1)
        for alias, target in _aliases(repo, ModelRef(namespace, name)).items():
            if target not in tree.models[key].versions:
                problems.append(f"{key}: alias {alias} -> {target} dangles")
    return problems


def _bounded(key: str, version: str, entry: Any) -> Any:
    """An index entry as the publisher writes it now (:meth:`ModelRecord.summary`): an entry
    written whole before entries were bounded says the same as model.json, only longer."""
    namespace, name = key.split("/", 1)
    try:
        return ModelRecord.from_summary(ModelRef(namespace, name, version), entry).summary()
    except (FormatError, ValueError, TypeError, AttributeError):
        return entry
