"""A transaction: the changes of one new revision, committed atomically (cvmfs-format.md §12).

:meth:`Transaction.commit` stores the content (:class:`~cvmfs_ml.publish.ingest.ContentPipeline`),
writes the catalogs bottom-up, then history and certificate, makes all of it durable, and only
then has the :class:`~cvmfs_ml.publish.repository.Publisher` sign and swap the manifest. Each step
is timed into the commit's stage counters (:mod:`cvmfs_ml.publish.profile`).
"""

from __future__ import annotations

import contextlib
import io
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.history import check_tag_name
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, deflate
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.archive import read_tar_plan
from cvmfs_ml.publish.entry_writer import EntryWriter
from cvmfs_ml.publish.filecache import FileCache
from cvmfs_ml.publish.ingest import ContentPipeline, IngestStats
from cvmfs_ml.publish.sources import SourceItem, join_repo_path, scan_folder, scan_tarball
from cvmfs_ml.publish.tree import TreeEditor, lookup
from cvmfs_ml.publish.workspace import CatalogWorkspace

if TYPE_CHECKING:
    from cvmfs_ml.publish.repository import Publisher

__all__ = ["PublishResult", "Transaction"]


@dataclass(frozen=True)
class PublishResult:
    """What a commit produced."""

    manifest: Manifest
    stats: IngestStats
    seconds: float

    @property
    def revision(self) -> int:
        return self.manifest.revision


class Transaction:
    """A set of changes to one repository, committed atomically.

    Use as a context manager: the repository lock is held from ``__enter__`` to ``__exit__``;
    leaving without :meth:`commit` discards everything (objects already written are unreferenced
    and removed by garbage collection).
    """

    def __init__(self, publisher: Publisher, *, wait: bool = True) -> None:
        self.publisher = publisher
        self._wait = wait
        self._ops: list[tuple[str, object]] = []
        self._lock: contextlib.AbstractContextManager[None] | None = None
        self._start_root: Digest | None = None
        self._base: tuple[bytes, Manifest] | None = None
        self.committed: PublishResult | None = None

    def __enter__(self) -> Transaction:
        self._lock = self.publisher.lock(wait=self._wait)
        self._lock.__enter__()
        try:
            # The revision this transaction starts from: the manifest swap compares against it.
            self._base = self.publisher._manifest_raw()
            self.publisher.check_reflog()  # fail now, not after ingesting gigabytes
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._lock is not None
        self._lock.__exit__(None, None, None)
        self._lock = None

    # -- recording changes --------------------------------------------------------------------
    def add_folder(self, src: Path, at: str = "/", *, nested_catalog: bool = False) -> None:
        """Copy the folder ``src`` to ``at`` (merging into existing directories)."""
        if not Path(src).is_dir():
            raise PublishError(f"{src} is not a folder")
        self._ops.append(
            (
                "items",
                (
                    lambda: scan_folder(
                        Path(src), at, include_xattrs=self.publisher.settings.include_xattrs
                    ),
                    at,
                    nested_catalog,
                ),
            )
        )

    def add_tarball(self, tarball: Path, at: str = "/", *, nested_catalog: bool = False) -> None:
        """Unpack ``tarball`` at ``at``; unsafe members refuse the whole tarball."""
        plan = read_tar_plan(Path(tarball), at)  # the whole archive, before anything is written
        self._ops.append(
            ("items", (lambda: scan_tarball(Path(tarball), at, plan), at, nested_catalog))
        )

    def add_items(
        self,
        make_items: Callable[[], Iterable[SourceItem]],
        at: str = "/",
        *,
        nested_catalog: bool = False,
    ) -> None:
        """Add entries from any source (``make_items`` is called at commit, parents first).

        For sources that are not a plain folder or tarball: a resolved snapshot, an unpacked
        image. ``at`` is created with its missing parents; ``nested_catalog`` makes it a
        nested catalog root. The items are consumed: a file's ``open`` and ``file_key`` are
        cleared once it is read, so that a publish of many files holds little per file.
        """
        self._ops.append(("items", (make_items, at, nested_catalog)))

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write one small file (metadata, index) at ``path``."""
        repo_path = join_repo_path(path, "")
        item = SourceItem(
            path=repo_path,
            mode=stat.S_IFREG | mode,
            mtime=int(time.time()),
            size=len(data),
            open=lambda: io.BytesIO(data),
        )
        self._ops.append(("items", (lambda: iter([item]), repo_path, False)))

    def symlink(self, path: str, target: str) -> None:
        repo_path = join_repo_path(path, "")
        item = SourceItem(
            path=repo_path,
            mode=stat.S_IFLNK | 0o777,
            mtime=int(time.time()),
            symlink=target,
            size=len(target.encode()),
        )
        self._ops.append(("items", (lambda: iter([item]), repo_path, False)))

    def mkdir(self, path: str) -> None:
        repo_path = join_repo_path(path, "")
        item = SourceItem(
            path=repo_path, mode=stat.S_IFDIR | 0o755, mtime=int(time.time()), size=4096
        )
        self._ops.append(("items", (lambda: iter([item]), repo_path, False)))

    def remove(self, path: str) -> None:
        repo_path = join_repo_path(path, "")
        if repo_path == "":
            raise PublishError("refusing to remove the repository root")
        self._ops.append(("remove", repo_path))

    def start_from(self, root_catalog: Digest) -> None:
        """Base this transaction on another root catalog (used by rollback)."""
        self._start_root = root_catalog

    # -- commit -------------------------------------------------------------------------------
    def commit(self, *, tag: str | None = None, description: str = "") -> PublishResult:
        if self._lock is None:
            raise PublishError("commit() outside 'with publisher.transaction() as txn:'")
        if self.committed is not None:
            raise PublishError("this transaction was already committed")
        if tag is not None:
            check_tag_name(tag)  # before any work: a refused name publishes nothing
        started = time.monotonic()
        publisher = self.publisher
        settings = publisher.settings
        uploads = getattr(publisher.store, "upload_workers", 0)
        if not settings.workers and uploads > settings.worker_count:
            # A remote store: workers also wait on the network, so more of them keep it busy
            # (memory stays bounded by the pipeline's in-flight byte cap, not the worker count).
            settings = settings.with_(workers=uploads)
        assert self._base is not None
        previous_raw, previous = self._base
        workspace = CatalogWorkspace(publisher.store, previous.catalog, settings.hash_algorithm)
        file_cache = FileCache(publisher.file_cache_path, settings)
        pipeline = ContentPipeline(publisher.store, settings, file_cache)
        publisher.progress = pipeline.stats
        try:
            if self._start_root is not None:
                workspace.replace_root(self._start_root)
            with pipeline:
                for kind, payload in self._ops:
                    if kind == "remove":
                        if lookup(workspace, payload) is None:  # type: ignore[arg-type]
                            raise PublishError(f"cannot remove {payload}: no such path")
                        workspace.remove(payload)  # type: ignore[arg-type]
                    else:
                        make_items, at, nested = payload  # type: ignore[misc]
                        self._apply(workspace, pipeline, make_items(), at, nested)
            stages = pipeline.stats.stages
            now = max(int(time.time()), previous.timestamp)
            with stages.measure("catalog"):
                root = workspace.commit(now=now, ttl=settings.ttl)
            revision = previous.revision + 1
            if root.revision != revision:
                raise PublishError(
                    f"root catalog revision {root.revision} != manifest revision {revision}"
                )
            with stages.measure("history"):
                history = publisher._write_history(
                    previous.history,
                    root.digest,
                    root.size,
                    revision,
                    now,
                    tag=tag,
                    description=description,
                )
            certificate = publisher.store.put_object(
                deflate(publisher.keys.certificate_pem),
                ObjectKind.CERTIFICATE,
                settings.hash_algorithm,
            )
            manifest = replace(
                previous,
                catalog=root.digest,
                catalog_size=root.size,
                ttl=settings.ttl,
                revision=revision,
                garbage_collectable=settings.garbage_collection,
                certificate=certificate,
                history=history,
                timestamp=now,
                unknown=(),
            )
            with stages.measure("fsync"):  # objects and catalogs durable before the manifest
                publisher.store.flush()
            with stages.measure("sign_swap"):
                manifest = publisher._sign_and_swap(manifest, previous_raw)
        finally:
            publisher.progress = None
            workspace.close()
            file_cache.close()
        self.committed = PublishResult(manifest, pipeline.stats, time.monotonic() - started)
        publisher.last_result = self.committed
        return self.committed

    def _apply(
        self,
        workspace: CatalogWorkspace,
        pipeline: ContentPipeline,
        items: Iterable[SourceItem],
        at: str,
        nested_root: bool,
    ) -> None:
        base = join_repo_path(at, "")
        editor = TreeEditor(workspace)
        editor.ensure_parents(base)
        writer = EntryWriter(editor, pipeline, base, nested_root)
        for item in items:
            writer.add(item)
        writer.finish()
