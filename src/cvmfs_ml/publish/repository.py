"""Creating repositories and publishing revisions (cvmfs-format.md §12, Appendix A).

A :class:`Publisher` owns one repository folder (a Stratum 0 web root) and its keys. Changes are
made in a :class:`Transaction` that holds the repository lock; ``commit`` writes data objects,
then catalogs bottom-up, then history, certificate and meta-info, then the reflog, and swaps the
signed manifest in **last**. A publisher killed at any point before that swap leaves the previous
revision published, untouched and mountable; the next transaction cleans up the leftovers.

The API is meant to be driven by a server too: one :class:`Publisher` per repository, one
transaction at a time (the lock also serialises separate processes), readers never blocked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from cvmfs_ml.cvmfs.catalog import DirectoryEntry, WritableCatalog
from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.history import TRUNK, TRUNK_PREVIOUS, HistoryDb, Tag, check_tag_name
from cvmfs_ml.cvmfs.keys import KeyPaths, KeySet
from cvmfs_ml.cvmfs.manifest import Manifest, sign_manifest
from cvmfs_ml.cvmfs.names import validate_fqrn
from cvmfs_ml.cvmfs.objects import ObjectKind, deflate, object_path
from cvmfs_ml.cvmfs.reflog import Reflog, RefType
from cvmfs_ml.cvmfs.whitelist import make_whitelist
from cvmfs_ml.errors import (
    ConfigError,
    FormatError,
    LockedError,
    NotFoundError,
    PublishError,
)
from cvmfs_ml.publish.ingest import IngestStats
from cvmfs_ml.publish.settings import (
    PublishSettings,
    load_settings,
    save_settings,
    whitelist_validity,
)
from cvmfs_ml.publish.transaction import PublishResult, Transaction
from cvmfs_ml.storage.base import ObjectStore, is_s3_location, open_store
from cvmfs_ml.storage.local import LocalStore
from cvmfs_ml.storage.reflog_repair import reachable_references

__all__ = ["PublishResult", "Publisher", "Transaction", "create_repository", "default_keys_dir"]

MANIFEST = ".cvmfspublished"
WHITELIST = ".cvmfswhitelist"
REFLOG = ".cvmfsreflog"
REFLOG_PENDING = ".cvmfsreflog.pending"
MASTER_REPLICA = ".cvmfs_master_replica"


def default_keys_dir(repo_dir: Path) -> Path:
    """``ROOT/../keys`` for a repository at ``ROOT/<fqrn>`` (docs/cli.md)."""
    return Path(repo_dir).resolve().parent.parent / "keys"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_repository(
    root: Path,
    fqrn: str,
    *,
    keys_dir: Path | None = None,
    settings: PublishSettings | None = None,
    now: dt.datetime | None = None,
    metainfo: dict | None = None,
    s3_config: Mapping[str, str] | None = None,
) -> Publisher:
    """``cvmfs_server mkfs`` without root: keys, skeleton, empty revision 0, whitelist, manifest.

    The repository lands at ``root/<fqrn>``; keys go to ``keys_dir`` (default ``root/../keys``).
    ``root`` may be ``s3://BUCKET[/PREFIX]`` (then ``keys_dir`` is required and ``s3_config``
    holds the ``CVMFS_S3_*`` settings, default the environment).
    """
    validate_fqrn(fqrn)
    if is_s3_location(str(root)):
        location: str | Path = f"{str(root).rstrip('/')}/{fqrn}"
        if keys_dir is None:
            raise ConfigError(f"{location}: pass --keys DIR (where the signing keys are kept)")
    else:
        location = Path(root) / fqrn
        keys_dir = keys_dir if keys_dir is not None else Path(root).resolve().parent / "keys"
    keys_dir = Path(keys_dir)
    # Checked before anything is written, so a refused create leaves no folder and no keys.
    existing = [p.name for p in KeyPaths.for_repo(keys_dir, fqrn) if p.exists()]
    store = open_store(location, s3_config)
    if store.exists(MANIFEST):
        raise PublishError(f"{store.location} already holds a repository")
    if existing:
        raise ConfigError(f"{keys_dir} already holds keys for {fqrn} ({', '.join(existing)}): "
                          "pass --keys with another folder, or remove them if no repository "
                          "uses them")  # fmt: skip
    store.create_skeleton()
    now = now or _utcnow()
    settings = settings or PublishSettings()
    keys = KeySet.create(keys_dir, fqrn, now)
    save_settings(keys_dir, fqrn, settings)
    stamp = int(now.timestamp())
    algorithm = settings.hash_algorithm

    # Revision 0: a root catalog with only the root directory (§4.7).
    with tempfile.TemporaryDirectory(dir=store.staging_dir()) as tmp:
        path = Path(tmp) / "root.db"
        root_entry = DirectoryEntry(
            path="",
            mode=stat.S_IFDIR | 0o755,
            size=4096,
            mtime=stamp,
            hardlinks=2,
            uid=os.getuid(),
            gid=os.getgid(),
        )
        catalog = WritableCatalog.create(path, root_entry, nested=False)
        catalog.finalize(
            revision=0, last_modified=stamp, previous_revision=None, subtree={}, ttl=settings.ttl
        )
        raw = path.read_bytes()
    catalog_digest = store.put_object(deflate(raw), ObjectKind.CATALOG, algorithm)
    publisher = Publisher(location, keys_dir, fqrn=fqrn, store=store)
    meta = metainfo or {
        "administrator": os.environ.get("USER", "cvmfs-ml"),
        "email": "",
        "organisation": "",
        "description": f"{fqrn}, published with cvmfs-ml",
        "custom": {"_generated_by": "cvmfs-ml"},
    }
    metainfo_digest = store.put_object(
        deflate(json.dumps(meta, indent=2).encode() + b"\n"), ObjectKind.METAINFO, algorithm
    )
    certificate = store.put_object(deflate(keys.certificate_pem), ObjectKind.CERTIFICATE, algorithm)
    store.put_bytes(MASTER_REPLICA, b"cvmfs-ml\n")
    publisher.resign(now=now, valid_for=dt.timedelta(days=settings.whitelist_days))
    history = publisher._write_history(
        None, catalog_digest, len(raw), 0, stamp, tag=None, description="empty repository"
    )
    manifest = Manifest(
        catalog=catalog_digest,
        catalog_size=len(raw),
        ttl=settings.ttl,
        revision=0,
        garbage_collectable=settings.garbage_collection,
        fqrn=fqrn,
        certificate=certificate,
        history=history,
        timestamp=stamp,
        metainfo=metainfo_digest,
    )
    store.flush()
    publisher._sign_and_swap(manifest, None)
    return publisher


class Publisher:
    """One repository (a folder or ``s3://BUCKET[/PREFIX]/FQRN``) and the keys that sign it."""

    def __init__(
        self,
        repo_dir: Path | str,
        keys_dir: Path | None = None,
        *,
        fqrn: str | None = None,
        s3_config: Mapping[str, str] | None = None,
        store: ObjectStore | None = None,
    ) -> None:
        self.store = store if store is not None else open_store(repo_dir, s3_config)
        self._own_store = store is None  # ours: the repository's settings decide how it writes
        self.location = self.store.location
        self.is_local = not is_s3_location(str(repo_dir))
        self.repo_dir = Path(repo_dir) if self.is_local else Path(self.store.staging_dir())
        """The repository folder (local), or the publisher's spool area (S3)."""
        if fqrn is None and not self.store.exists(MANIFEST):
            raise NotFoundError(f"{self.location}/{MANIFEST}", "no repository here")
        if keys_dir is None and not self.is_local:
            raise ConfigError(f"{self.location}: pass --keys DIR (where the signing keys are kept)")
        self.keys_dir = Path(keys_dir) if keys_dir is not None else default_keys_dir(repo_dir)
        self.fqrn = fqrn or self.manifest().fqrn or self.location.rstrip("/").rsplit("/", 1)[-1]
        self.keys = KeySet.load(self.keys_dir, self.fqrn)
        self.settings = load_settings(self.keys_dir, self.fqrn)
        self._apply_store_settings()
        self.progress: IngestStats | None = None
        """The running commit's counters (files and bytes read, objects new and reused), for
        progress displays that poll them; None between commits."""
        self.last_result: PublishResult | None = None

    @classmethod
    def open(
        cls,
        repo_dir: Path | str,
        keys_dir: Path | None = None,
        *,
        s3_config: Mapping[str, str] | None = None,
    ) -> Publisher:
        return cls(repo_dir, keys_dir, s3_config=s3_config)

    @property
    def file_cache_path(self) -> Path:
        """The publisher's :class:`~cvmfs_ml.publish.filecache.FileCache` (beside the keys)."""
        return self.keys_dir / f"{self.fqrn}.files.db"

    def manifest(self) -> Manifest:
        return Manifest.parse(self.store.get_bytes(MANIFEST))

    def _manifest_raw(self) -> tuple[bytes, Manifest]:
        """The manifest's bytes (what the swap compares against) and its parsed form."""
        raw = self.store.get_bytes(MANIFEST)
        return raw, Manifest.parse(raw)

    def save_settings(self, settings: PublishSettings) -> None:
        save_settings(self.keys_dir, self.fqrn, settings)
        self.settings = settings
        self._apply_store_settings()

    def _apply_store_settings(self) -> None:
        """``CVMFS_ML_DIRECT_WRITES`` on a local store this publisher opened (a store given by
        the caller is only ever switched off: the caller chose how it writes)."""
        if not isinstance(self.store, LocalStore):
            return
        if self._own_store or not self.settings.direct_writes:
            self.store.direct_writes = self.settings.direct_writes

    # -- locking ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: bool = True) -> Iterator[None]:
        """Serialise publishers (threads and processes) on this repository.

        The lock file belongs to the repository (beside its folder, or in the S3 spool area),
        not to a keys folder: publishers with copies of the keys still meet on it.
        """
        with open(self.store.lock_path(), "a+") as handle:
            flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(handle, flags)
            except BlockingIOError as exc:
                raise LockedError(f"{self.fqrn} is being published by another process") from exc
            try:
                self._recover()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _recover(self) -> None:
        """Finish or undo what a killed publisher left behind (under the lock)."""
        store = self.store
        if store.exists(REFLOG_PENDING):
            pending = store.get_bytes(REFLOG_PENDING)
            manifest = self.manifest()
            if (
                manifest.reflog is not None
                and hash_bytes(pending, manifest.reflog.algorithm) == manifest.reflog
            ):
                store.put_bytes(REFLOG, pending, durable=True)  # killed after the manifest swap
            store.remove(REFLOG_PENDING)  # (killed before it: the old reflog still matches)
        store.clean_staging()

    def transaction(self, *, wait: bool = True) -> Transaction:
        return Transaction(self, wait=wait)

    # -- revision metadata --------------------------------------------------------------------
    def _materialise(self, digest: Digest, kind: ObjectKind, folder: Path) -> Path:
        path = folder / f"{digest.hex}{kind.value}.db"
        with path.open("wb") as out:
            self.store.fetch_into(object_path(digest, kind), digest, True, out)
        return path

    def _edit_history(
        self, previous: Digest | None, edit: Callable[[dict[str, Tag]], None]
    ) -> Digest:
        """Store a new tag database: the tags of ``previous`` as changed by ``edit``.

        Every history change (a commit, a new or moved tag, a removed tag) goes through here,
        so each new database links back to ``previous`` the same way.
        """
        with tempfile.TemporaryDirectory(dir=self.store.staging_dir()) as tmp:
            by_name: dict[str, Tag] = {}
            if previous is not None:
                with HistoryDb.open(
                    self._materialise(previous, ObjectKind.HISTORY, Path(tmp))
                ) as old:
                    by_name = {t.name: t for t in old.tags()}
            edit(by_name)
            path = Path(tmp) / "history.db"
            with HistoryDb.create(
                path, self.fqrn, previous, algorithm=self.settings.hash_algorithm
            ) as history:
                for item in by_name.values():
                    history.set(item)
            return self.store.put_object(
                deflate(path.read_bytes()),
                ObjectKind.HISTORY,
                self.settings.hash_algorithm,
            )

    def _write_history(
        self,
        previous: Digest | None,
        root: Digest,
        root_size: int,
        revision: int,
        stamp: int,
        *,
        tag: str | None,
        description: str = "",
    ) -> Digest:
        """History of a new revision: ``trunk`` moves on, the old one becomes ``trunk-previous``."""
        head = Tag(
            name=TRUNK,
            root_catalog=root,
            revision=revision,
            timestamp=stamp,
            description="current HEAD",
            size=root_size,
        )

        def commit(tags: dict[str, Tag]) -> None:
            if TRUNK in tags:  # upstream's kPreviousHeadTagDescription
                tags[TRUNK_PREVIOUS] = replace(
                    tags[TRUNK], name=TRUNK_PREVIOUS, description="default undo target"
                )
            tags[TRUNK] = head
            if tag:
                tags[tag] = replace(head, name=tag, description=description)
            elif self.settings.auto_tag and revision > 0:
                name = "generic-" + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
                while name in tags:
                    name += "_"
                tags[name] = replace(head, name=name, description="automatic tag")

        return self._edit_history(previous, commit)

    def _sign_and_swap(
        self,
        manifest: Manifest,
        expected: bytes | None,
        rebuilt: list[tuple[Digest, RefType]] | None = None,
    ) -> Manifest:
        """Update the reflog, sign the manifest and swap it in: the publish point.

        ``expected`` is the manifest the change started from: the swap is a compare-and-swap
        against it, so a publisher that lost a race fails instead of dropping a revision.
        Everything the new manifest names was made durable (``store.flush``) by the caller.
        ``rebuilt`` starts a new reflog with these references instead of extending the stored
        one (:meth:`repair_reflog`).
        """
        store = self.store
        with tempfile.TemporaryDirectory(dir=store.staging_dir()) as tmp:
            path = Path(tmp) / REFLOG
            if rebuilt is not None:
                reflog = Reflog.create(path, self.fqrn)
                for digest, kind in rebuilt:
                    reflog.add(digest, kind)
            else:
                stored = self._open_stored_reflog(path, has_manifest=expected is not None)
                reflog = stored if stored is not None else Reflog.create(path, self.fqrn)
            reflog.add(manifest.catalog, RefType.CATALOG)
            if manifest.certificate is not None:
                reflog.add(manifest.certificate, RefType.CERTIFICATE)
            if manifest.history is not None:
                reflog.add(manifest.history, RefType.HISTORY)
            if manifest.metainfo is not None:
                reflog.add(manifest.metainfo, RefType.METAINFO)
            reflog.close()
            raw_reflog = path.read_bytes()
        manifest = replace(manifest, reflog=hash_bytes(raw_reflog, manifest.algorithm))
        signed = sign_manifest(manifest.body(), self.keys.repo_private)
        store.put_bytes(REFLOG_PENDING, raw_reflog, durable=True)
        try:
            store.swap_bytes(MANIFEST, signed, expected)
        except BaseException:
            store.remove(REFLOG_PENDING)
            raise
        store.put_bytes(REFLOG, raw_reflog, durable=True)
        store.remove(REFLOG_PENDING)
        return manifest

    def _open_stored_reflog(self, path: Path, *, has_manifest: bool = True) -> Reflog | None:
        """The stored reflog copied to ``path`` and opened for writing, ``None`` if there is
        none and none should be; :class:`PublishError` if it does not open, is missing, or is
        not the one the stored manifest names.

        The stored manifest, not the one a change started from: a writer that ignored the lock
        may have published meanwhile, and the swap then fails saying so.
        """
        named = self.manifest().reflog if has_manifest else None
        if not self.store.exists(REFLOG):
            if named is not None:
                raise self._damaged_reflog("it is missing, and the manifest names one")
            return None
        raw = self.store.get_bytes(REFLOG)
        if named is not None and hash_bytes(raw, named.algorithm) != named:
            raise self._damaged_reflog(f"its hash is not the manifest's ({named.hex[:12]}...)")
        path.write_bytes(raw)
        try:
            return Reflog.open(path, writable=True)
        except FormatError as exc:
            raise self._damaged_reflog(exc.reason) from None

    def check_reflog(self) -> None:
        """Refuse to start a change that the reflog would stop at its end (before any upload
        is ingested); :meth:`_sign_and_swap` checks it again. Writes nothing to the repository
        (``repo check`` runs it too). Its copy goes to the staging folder, as a publish's other
        scratch files do: the system's temporary folder may be small or not writable."""
        with tempfile.TemporaryDirectory(dir=self.store.staging_dir()) as tmp:
            reflog = self._open_stored_reflog(Path(tmp) / REFLOG)
            if reflog is not None:
                reflog.close()

    def _damaged_reflog(self, reason: str) -> PublishError:
        return PublishError(f"{REFLOG} of {self.fqrn} is damaged ({reason}); nothing was "
                            f"published: rebuild it with 'cvmfs-ml repo check "
                            f"{self.location} --repair-reflog'")  # fmt: skip

    def repair_reflog(self) -> int:
        """Rebuild ``.cvmfsreflog`` from the catalog and history chains (upstream's
        ``cvmfs_server check -r``) and re-sign the manifest with its hash; the revision and
        everything else stay as they are. Returns the number of references."""
        with self.lock():
            raw, manifest = self._manifest_raw()
            refs = reachable_references(
                self.store, manifest, (tag.root_catalog for tag in self.tags())
            )
            self._sign_and_swap(manifest, raw, rebuilt=refs)
            return len(refs)

    def resign(
        self, *, now: dt.datetime | None = None, valid_for: dt.timedelta | None = None
    ) -> None:
        """Sign a fresh whitelist with the master key (do this before it expires)."""
        if valid_for is not None:
            whitelist_validity(valid_for / dt.timedelta(days=1))
        if self.keys.master_private is None:
            raise PublishError(f"no master key {self.fqrn}.masterkey in {self.keys_dir}")
        days = self.settings.whitelist_days
        whitelist = make_whitelist(
            self.fqrn,
            self.keys.certificate_pem,
            self.keys.master_private,
            now or _utcnow(),
            valid_for or dt.timedelta(days=days),
            algorithm=self.settings.hash_algorithm,
        )
        self.store.put_bytes(WHITELIST, whitelist, durable=True)

    def tags(self) -> list[Tag]:
        manifest = self.manifest()
        if manifest.history is None:
            return []
        # In memory: nothing is written, so gc can read the tags on a full disk.
        raw = self.store.fetch(
            object_path(manifest.history, ObjectKind.HISTORY), manifest.history, compressed=True
        )
        with HistoryDb.from_bytes(raw, f"history {manifest.history.hex}") as history:
            return list(history.tags())

    def tag(self, name: str, description: str = "", *, revision_of: str | None = None) -> Manifest:
        """Add (or move) a named tag to the current revision, or to tag ``revision_of``."""
        check_tag_name(name)
        with self.lock():
            raw, manifest = self._manifest_raw()

            def add(tags: dict[str, Tag]) -> None:
                target = tags.get(revision_of or TRUNK)
                if target is None:
                    raise PublishError(f"no tag {revision_of or TRUNK!r} to tag")
                tags[name] = replace(target, name=name, description=description)

            history = self._edit_history(manifest.history, add)
            return self._resign_manifest(manifest, raw, history)

    def remove_tag(self, name: str) -> Manifest:
        """Drop a named tag (its objects stay until garbage collection)."""
        if name in (TRUNK, TRUNK_PREVIOUS):
            raise PublishError(f"{name!r} is maintained by the publisher and cannot be removed")
        with self.lock():
            raw, manifest = self._manifest_raw()

            def drop(tags: dict[str, Tag]) -> None:
                if tags.pop(name, None) is None:
                    raise PublishError(f"no tag {name!r}")

            history = self._edit_history(manifest.history, drop)
            return self._resign_manifest(manifest, raw, history)

    def _resign_manifest(self, manifest: Manifest, raw: bytes, history: Digest) -> Manifest:
        """The same revision with a new history: tags change without a new tree."""
        stamp = max(int(time.time()), manifest.timestamp)
        self.store.flush()
        return self._sign_and_swap(replace(manifest, history=history, timestamp=stamp), raw)

    def rollback(self, tag: str) -> PublishResult:
        """Publish the tree of ``tag`` again as a new revision (revisions only move forward)."""
        tags = {t.name: t for t in self.tags()}
        if tag not in tags:
            raise PublishError(f"no tag {tag!r}; known: {', '.join(sorted(tags))}")
        with self.transaction() as txn:
            txn.start_from(tags[tag].root_catalog)
            return txn.commit(description=f"rollback to {tag}")
