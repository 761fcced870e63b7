"""Publishing, removing and aliasing model versions (the layout is in :mod:`.layout`).

Every change is ONE transaction holding the repository lock: the version folder (a nested
catalog) with its files and ``model.json``, the alias symlinks and the updated
``/.cvmfs-ml/index.json`` become visible to readers in the same revision, or not at all.

The index is read from the *published* repository after the lock is taken, never from a copy
read earlier, so publishers in other threads or processes cannot make each other's entries
disappear: each one sees the revision the previous one committed. The slow part, hashing the
source (:mod:`.prepare`), happens before the lock, so concurrent publishers still hash in
parallel.

Versions are immutable: publishing an existing version again with the same bytes (same SHA-256
for every path) returns the existing record without a new revision; different bytes are refused
with :class:`~cvmfs_ml.errors.PublishError` naming the files that differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import FormatError, NotFoundError, PublishError
from cvmfs_ml.models import tree as model_tree
from cvmfs_ml.models.layout import (
    ALIAS_LATEST,
    INDEX_PATH,
    Index,
    ModelFile,
    ModelRecord,
    ModelRef,
    utc_timestamp,
    validate_component,
)
from cvmfs_ml.models.prepare import (
    describe_models,
    prepare_source,
    primary_format,
    version_items,
    whoami,
)
from cvmfs_ml.models.reader_cache import reader_cache
from cvmfs_ml.models.sources.limits import MAX_CATALOGS
from cvmfs_ml.models.sources.local import SourceTree
from cvmfs_ml.models.tree import (
    REINDEX_HINT,
    TreeReader,
    read_index,
    read_record,
    scan_models,
    stat_or_none,
)
from cvmfs_ml.publish.repository import Publisher, Transaction
from cvmfs_ml.publish.sources import SourceItem

__all__ = [
    "RESERVED_VERSIONS",
    "ModelBatch",
    "PreparedVersion",
    "list_models",
    "open_published",
    "prepare_version",
    "model_info",
    "prepare_source",
    "publish_model",
    "reindex",
    "remove_alias",
    "remove_model",
    "set_alias",
]

log = logging.getLogger(__name__)

#: Names a version may not take: they are aliases every model may have.
RESERVED_VERSIONS = frozenset({ALIAS_LATEST})



# -- reading what is published, under the lock ------------------------------------------------
def _reader_cache(publisher: Publisher) -> ObjectCache:
    """One cache per process and repository for reading back what is published
    (:mod:`.reader_cache`: in the user's cache folder, bounded, removed with the process).

    The key includes the master key file's identity: a repository deleted and created again
    at the same path starts at revision 0, which the old cache would take for a rollback.
    """
    key_file = os.stat(publisher.keys.paths.master_public)
    return reader_cache((publisher.location, key_file.st_ino, key_file.st_mtime_ns))


@contextlib.contextmanager
def _published(publisher: Publisher) -> Iterator[Repository]:
    """The repository as currently published, verified with its master key.

    Call with the lock held (inside ``publisher.transaction()``) so that what is read is what
    the transaction will change.
    """
    repo = Repository.open(
        publisher.store,
        fqrn=publisher.fqrn,
        public_key=publisher.keys.paths.master_public,
        cache=_reader_cache(publisher),
        prefetch_workers=1,
    )
    try:
        yield repo
    finally:
        repo.close()


def _load_index(repo: TreeReader, warn: Callable[[str], None] | None = None) -> Index:
    """The index, rebuilt from the tree (the truth) when the file is missing or unreadable,
    so a hand edit never blocks the next publish: that publish writes a repaired index.
    ``warn`` hears of an unreadable one (a missing one is a repository with no model yet)."""
    try:
        index = read_index(repo)
    except FormatError as exc:
        return _from_tree(repo, exc, warn)
    if not index.models:
        try:
            repo.stat(INDEX_PATH)
        except FileNotFoundError:
            return scan_models(repo)
    return index


def _from_tree(repo: TreeReader, exc: FormatError, warn: Callable[[str], None] | None) -> Index:
    """The index rebuilt from the tree, in place of the unreadable one ``exc`` describes."""
    if warn is not None:
        warn(f"{exc}; models read from the tree instead ({REINDEX_HINT})")
    return scan_models(repo)


def _write_index(txn: Transaction, index: Index) -> None:
    index.updated = utc_timestamp()
    txn.add_bytes(INDEX_PATH, index.to_bytes())


def _add_items(txn: Transaction, items: list[SourceItem], at: str, *, nested: bool) -> None:
    """Queue entries we built ourselves (resolved symlinks, ``model.json``) at ``at``.

    A model version is the *resolved* view of its source (a Hugging Face snapshot is all
    symlinks), so it cannot go through ``add_folder``.
    """
    txn.add_items(lambda: iter(items), at, nested_catalog=nested)


#: The published repository, read with the publisher's cached reader (call under the lock).
open_published = _published


@dataclass
class PreparedVersion:
    """A version scanned and hashed outside the lock, ready to be queued in a transaction."""

    tree: SourceTree
    record: ModelRecord
    aliases: list[str]


def _difference(old: dict[str, str], new: dict[str, str]) -> str:
    parts = []
    for label, names in (
        ("changed", sorted(p for p in old.keys() & new.keys() if old[p] != new[p])),
        ("added", sorted(new.keys() - old.keys())),
        ("removed", sorted(old.keys() - new.keys())),
    ):
        if names:
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            shown = ", ".join(names[:10]) + more
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _check_aliases(ref: ModelRef, aliases: Sequence[str]) -> list[str]:
    out = []
    for alias in aliases:
        validate_component(alias, "alias", version=True)
        if alias == ref.version:
            raise PublishError(f"alias {alias!r} is the version name itself")
        if alias not in out:
            out.append(alias)
    return out


# -- the API ------------------------------------------------------------------------------------
def prepare_version(
    src: Path,
    ref: ModelRef,
    *,
    source: dict | None = None,
    description: str = "",
    license: str | None = None,
    extra: dict | None = None,
    aliases: Sequence[str] = (ALIAS_LATEST,),
    publisher_name: str | None = None,
    known_sha256: Mapping[str, str] | None = None,
    max_catalogs: int = MAX_CATALOGS,
) -> PreparedVersion:
    """Scan, hash and describe ``src`` as version ``ref`` (slow; call outside the lock).

    ``known_sha256`` names files already verified against a digest (see :func:`hash_tree`);
    ``src`` may hold ``max_catalogs`` ``.cvmfscatalog`` files, each a nested catalog."""
    version = ref.require_version()
    if version in RESERVED_VERSIONS:
        raise PublishError(f"{version!r} is reserved for an alias; pick another version name")
    alias_list = _check_aliases(ref, aliases)
    tree, detected, detected_license = prepare_source(
        Path(src), known_sha256, max_catalogs=max_catalogs
    )
    models, warnings = describe_models(tree)
    record = ModelRecord(
        ref=ref,
        format=primary_format(models, tree),
        description=description,
        license=license if license is not None else detected_license,
        created=utc_timestamp(),
        published_by=publisher_name or whoami(),
        source=dict(source) if source is not None else detected,
        files=[ModelFile(f.path, f.size, f.sha256) for f in tree.files],
        size=tree.size,
        file_count=len(tree.files),
        models=models,
        extra=dict(extra or {}),
        warnings=warnings,
    )
    _check_readable(record)
    return PreparedVersion(tree, record, alias_list)


def _check_readable(record: ModelRecord) -> None:
    """Refuse a ``model.json`` larger than readers load (:data:`.tree.MAX_MODEL_JSON_BYTES`):
    published, it would fail ``model info``, ``model check`` and the version published again."""
    size, limit = len(record.to_bytes()), model_tree.MAX_MODEL_JSON_BYTES
    if size > limit:
        raise PublishError(
            f"{record.ref}: its model.json would be {size} bytes, more than the {limit} bytes"
            f" readers load ({record.file_count} files, {len(record.models)} described); publish"
            " fewer files (pack small ones into an archive) or split the model into versions"
        )


class ModelBatch:
    """Model changes queued into one transaction (a sync round: one revision for all).

    Open it inside ``publisher.transaction()`` with the published repository read under that
    lock; call :meth:`finish` before ``txn.commit()`` to write the index once.
    """

    def __init__(self, txn: Transaction, repo: Repository) -> None:
        self.txn = txn
        self.repo = repo
        self.index = _load_index(repo)
        self.changed = False
        self._staged: set[str] = set()

    def add_version(self, prepared: PreparedVersion) -> tuple[ModelRecord, bool]:
        """Queue a version and its aliases; (record, False) when the same bytes are there."""
        ref, record = prepared.record.ref, prepared.record
        existing = stat_or_none(self.repo, ref.path)
        if existing is not None:
            return _republish(self.repo, ref, existing, record), False
        if ref.path in self._staged:
            raise PublishError(f"{ref} is queued twice in one transaction")
        for alias in prepared.aliases:
            entry = stat_or_none(self.repo, ref.alias_path(alias))
            if entry is not None and not entry.is_symlink:
                raise PublishError(f"{ref.key}/{alias} is a version, not an alias")
        _add_items(
            self.txn, version_items(prepared.tree, ref, record.to_bytes()), ref.path, nested=True
        )
        for alias in prepared.aliases:
            self.txn.symlink(ref.alias_path(alias), ref.require_version())
        self.index.add(record, prepared.aliases)
        self._staged.add(ref.path)
        self.changed = True
        record.aliases = sorted(prepared.aliases)
        return record, True

    def set_alias(self, ref: ModelRef, alias: str) -> bool:
        """Point ``alias`` at version ``ref`` (published or queued); False if it already does."""
        version = ref.require_version()
        validate_component(alias, "alias", version=True)
        if alias == version:
            raise PublishError(f"alias {alias!r} is the version name itself")
        current = stat_or_none(self.repo, ref.alias_path(alias))
        if current is not None and not current.is_symlink:
            raise PublishError(f"{ref.key}/{alias} is a version, not an alias")
        if current is not None and self.repo.readlink(ref.alias_path(alias)) == version:
            return False
        if ref.path not in self._staged:
            target = stat_or_none(self.repo, ref.path)
            if target is None or not target.is_dir:
                raise NotFoundError(f"model version {ref}", self.txn.publisher.fqrn)
            _ensure_indexed(self.index, read_record(self.repo, ref))
        self.index.set_alias(ref, alias)
        self.txn.symlink(ref.alias_path(alias), version)
        self.changed = True
        return True

    def finish(self) -> None:
        if self.changed:
            _write_index(self.txn, self.index)


def publish_model(
    publisher: Publisher,
    src: Path,
    ref: ModelRef,
    *,
    source: dict | None = None,
    description: str = "",
    license: str | None = None,
    extra: dict | None = None,
    aliases: Sequence[str] = (ALIAS_LATEST,),
    publisher_name: str | None = None,
    known_sha256: Mapping[str, str] | None = None,
    max_catalogs: int = MAX_CATALOGS,
) -> ModelRecord:
    """Publish the file or folder ``src`` as version ``ref`` in one transaction.

    ``source`` overrides the detected provenance (``{"type": "local", ...}`` or, for a hub
    cache snapshot, ``{"type": "huggingface", "repo_id", "revision", ...}``); ``license``
    overrides the one the model card or ``config.json`` declares. ``aliases`` (default
    ``latest``) are pointed at the new version. Returns the record as published, or the
    existing one when the same bytes were already published under ``ref`` (no new revision).
    ``known_sha256`` names files already verified against a digest (see :func:`hash_tree`).
    A ``.cvmfscatalog`` file in a folder of ``src`` makes that folder a nested catalog, as
    upstream's publisher does; more than ``max_catalogs`` are refused before anything is read.
    """
    prepared = prepare_version(
        src,
        ref,
        source=source,
        description=description,
        license=license,
        extra=extra,
        aliases=aliases,
        publisher_name=publisher_name,
        known_sha256=known_sha256,
        max_catalogs=max_catalogs,
    )
    with publisher.transaction() as txn:
        with _published(publisher) as repo:
            batch = ModelBatch(txn, repo)
            record, added = batch.add_version(prepared)
            if not added:
                return record
        batch.finish()
        txn.commit(description=f"publish model {ref}")
    return record


def _republish(repo: Repository, ref: ModelRef, entry: Any, record: ModelRecord) -> ModelRecord:
    if entry.is_symlink:
        raise PublishError(f"{ref} is an alias, not a version")
    try:
        existing = read_record(repo, ref)
    except FileNotFoundError as exc:
        raise PublishError(f"{ref.path} exists but is not a model version (no model.json)") from exc
    difference = _difference(existing.digests(), record.digests())
    if difference:
        raise PublishError(
            f"{ref} is already published with different content ({difference}); "
            "versions are immutable: publish a new version"
        )
    return existing


def remove_model(publisher: Publisher, ref: ModelRef) -> None:
    """Remove one version (a new revision; its objects stay until ``repo gc``).

    Aliases that pointed at it are removed, except ``latest``, which moves to the most recently
    created remaining version. The model (and an emptied namespace) folder goes with its last
    version.
    """
    ref.require_version()
    with publisher.transaction() as txn:
        with _published(publisher) as repo:
            entry = stat_or_none(repo, ref.path)
            if entry is None:
                raise NotFoundError(f"model version {ref}", publisher.fqrn)
            if entry.is_symlink:
                raise PublishError(
                    f"{ref} is an alias, not a version: remove it with "
                    f"`cvmfs-ml model alias REPO {ref.key} {ref.version} --remove` (remove_alias)"
                )
            record = read_record(repo, ref)
            index = _load_index(repo)
            _ensure_indexed(index, record)
            model = index.models[ref.key]
            others = {v: s for v, s in model.versions.items() if v != ref.version}
            pointing = sorted(a for a, v in model.aliases.items() if v == ref.version)
            namespace_entries = repo.listdir(f"/{ref.namespace}")
        index.remove(ref)
        if not others:
            if len(namespace_entries) == 1:
                txn.remove(f"/{ref.namespace}")
            else:
                txn.remove(ref.model_path)
        else:
            txn.remove(ref.path)
            for alias in pointing:
                if alias == ALIAS_LATEST:
                    newest = max(others, key=lambda v: (str(others[v].get("created", "")), v))
                    txn.symlink(ref.alias_path(alias), newest)
                    index.set_alias(ref.with_version(newest), alias)
                else:
                    txn.remove(ref.alias_path(alias))
        _write_index(txn, index)
        txn.commit(description=f"remove model {ref}")


def _ensure_indexed(index: Index, record: ModelRecord) -> None:
    entry = index.models.get(record.ref.key)
    if entry is None or record.version not in entry.versions:
        index.add(record)


def _as_ref(ns_name: str | ModelRef) -> ModelRef:
    ref = ns_name if isinstance(ns_name, ModelRef) else ModelRef.parse(ns_name)
    return ref.with_version(None)


def set_alias(publisher: Publisher, ns_name: str | ModelRef, alias: str, version: str) -> None:
    """Point ``ns/name/<alias>`` at ``version`` (creating or moving the alias)."""
    ref = _as_ref(ns_name).with_version(version)
    with publisher.transaction() as txn:
        with _published(publisher) as repo:
            batch = ModelBatch(txn, repo)
            if not batch.set_alias(ref, alias):
                return  # already there: no new revision
        batch.finish()
        txn.commit(description=f"alias {ref.key}/{alias} -> {version}")


def remove_alias(publisher: Publisher, ns_name: str | ModelRef, alias: str) -> None:
    """Remove the alias ``ns/name/<alias>`` (the version it named stays)."""
    ref = _as_ref(ns_name)
    with publisher.transaction() as txn:
        with _published(publisher) as repo:
            current = stat_or_none(repo, ref.alias_path(alias))
            if current is None or not current.is_symlink:
                raise NotFoundError(f"alias {ref.key}/{alias}", publisher.fqrn)
            index = _load_index(repo)
        index.remove_alias(ref, alias)
        txn.remove(ref.alias_path(alias))
        _write_index(txn, index)
        txn.commit(description=f"remove alias {ref.key}/{alias}")


def reindex(publisher: Publisher) -> Index:
    """Rewrite the index from the tree (repairs an index edited or removed by hand)."""
    with publisher.transaction() as txn:
        with _published(publisher) as repo:
            index = scan_models(repo)
        _write_index(txn, index)
        txn.commit(description="rebuild model index")
    return index


def list_models(
    repo: TreeReader, *, full: bool = False, warn: Callable[[str], None] | None = None
) -> list[ModelRecord]:
    """Every published version, sorted by reference, from the index (one file read).

    Index records carry no ``files``/``models``; ``full=True`` reads every ``model.json``.
    An index that does not read (or has an entry that does not) gives way to the tree, as it
    does for the publisher, and ``warn`` is told once (default: the log).
    """
    warn = warn or log.warning
    try:
        records = _load_index(repo, warn).records()
    except FormatError as exc:  # an entry whose summary is not one we write
        records = _from_tree(repo, exc, warn).records()
    if not full:
        return records
    return [read_record(repo, r.ref) for r in records]


def model_info(repo: TreeReader, ref_or_ns_name: str | ModelRef) -> ModelRecord:
    """The full record of ``ns/name:version``; an alias resolves, no version means ``latest``."""
    ref = ref_or_ns_name if isinstance(ref_or_ns_name, ModelRef) else ModelRef.parse(ref_or_ns_name)
    return read_record(repo, ref)
