"""The read API: open a repository, trust it, and read its tree (cvmfs-format.md §8.3, §10).

Boot: manifest -> whitelist (master-key signature, name, expiry) -> certificate (hash,
whitelisted fingerprint) -> manifest signature -> no rollback (the breadcrumb) -> root catalog.
Every object is checked against its hash before use; catalogs and file chunks are kept
decompressed in an :class:`~cvmfs_ml.client.cache.ObjectCache`; nested catalogs load on demand.

The same class reads a local repository folder (:class:`~cvmfs_ml.storage.local.LocalStore`) and
an HTTP one (:class:`~cvmfs_ml.client.fetcher.Fetcher`): both offer ``fetch`` and ``fetch_into``.
Its parts live beside it: :mod:`.sources` (a location to a source), :mod:`.ensemble` and
:mod:`.trust` (the trust chain), :mod:`.refresh` (boot and new revisions), :mod:`.fetch_once`
(objects into the cache, each fetched once), :mod:`.files` (file handles), :mod:`.prefetch`
(fetching ahead of readers).
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import load_blacklist
from cvmfs_ml.client.entries import listed, present, resolve_path
from cvmfs_ml.client.external import ExternalSource, external_unset
from cvmfs_ml.client.fetch_once import FetchOnce
from cvmfs_ml.client.files import CvmfsFile, FileLayout
from cvmfs_ml.client.prefetch import Fetched, Prefetcher, fit_window
from cvmfs_ml.client.refresh import RevisionRefresh
from cvmfs_ml.client.sources import FETCHER_OPTIONS, load_keys, open_source
from cvmfs_ml.client.trust import Blacklist, TrustAnchors
from cvmfs_ml.cvmfs.catalog import Catalog, Chunk, DirectoryEntry, Flag
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.history import HistoryDb, Tag
from cvmfs_ml.cvmfs.objects import ObjectKind
from cvmfs_ml.errors import (
    FormatError,
    NotFoundError,
)
from cvmfs_ml.storage.base import ObjectSource

__all__ = ["FETCHER_OPTIONS", "CvmfsFile", "FileLayout", "ObjectSource", "Repository"]


class Repository(RevisionRefresh):
    """A verified, read-only view of one revision of a repository."""

    def __init__(
        self,
        source: ObjectSource,
        fqrn: str,
        *,
        public_keys: Sequence[Any] = (),
        cache: ObjectCache | None = None,
        verify: bool = True,
        root_hash: Digest | None = None,
        tag: str | None = None,
        now: dt.datetime | None = None,
        prefetch_workers: int = 8,
        prefetch_min_bytes: int = 32 * 2**20,
        tracer: Any = None,
        symlink_variables: Mapping[str, str] | None = None,
        external_url: str | None = None,
        external_proxy: str | None = None,
        external_source: ExternalSource | None = None,
        blacklist: Blacklist | None = None,
    ) -> None:
        self.source = source
        self.symlink_variables: Mapping[str, str] = (
            os.environ if symlink_variables is None else symlink_variables
        )
        """What ``$(VAR)`` in link targets expands from (upstream: the client's environment,
        which holds its configuration parameters too)."""
        self.external_url = external_url
        """``CVMFS_EXTERNAL_URL``: where external files (flag 128) are fetched from."""
        self.external_proxy = external_proxy
        self._external: ExternalSource | None = external_source
        """The external-file fetcher: given (from the configuration), or made from
        ``external_url`` and ``external_proxy`` on first use."""
        self.fqrn = fqrn
        self.anchors = TrustAnchors(
            fqrn, list(public_keys), blacklist if blacklist is not None else load_blacklist()
        )
        """What this repository is trusted by: its name, master keys and the site blacklist."""
        if cache is None:
            self._own_cache = tempfile.TemporaryDirectory(prefix="cvmfs-ml-cache.")
            cache = ObjectCache(Path(self._own_cache.name), None)
        self.cache = cache
        self._verify = verify
        self._now = now
        self._lock = threading.RLock()
        self._catalogs: dict[tuple[str, str], Catalog] = {}
        self._pool = ThreadPoolExecutor(
            max(1, prefetch_workers), thread_name_prefix="cvmfs-ml-fetch"
        )
        self.prefetch_min_bytes = prefetch_min_bytes
        self.tracer = tracer
        self._init_refresh(pinned=tag is not None or root_hash is not None)
        self._fetches = FetchOnce(source, cache, self._count)
        self.manifest = self._boot()
        self.root_hash = self.manifest.catalog
        if tag is not None:
            found = self.tag(tag)
            if found is None:
                raise NotFoundError(f"tag {tag}", fqrn)
            root_hash = found.root_catalog
        if root_hash is not None:
            self.root_hash = root_hash
        size = self.manifest.catalog_size if self.root_hash == self.manifest.catalog else 0
        self.root = self._load_catalog("", self.root_hash, size or None)  # B bounds the root
        self._tree = {"": self.root}  # this revision's catalogs by mount point, as walked

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        location: str | os.PathLike[str] | ObjectSource,
        fqrn: str | None = None,
        public_key: str | os.PathLike[str] | Sequence[Any] | None = None,
        *,
        cache: ObjectCache | str | os.PathLike[str] | None = None,
        proxy: str | Sequence[Sequence[str]] | None = None,
        quota_bytes: int | None = None,
        **options: Any,
    ) -> Repository:
        """Open and verify a local repository folder or a chain of HTTP servers.

        ``location`` is a folder (a Stratum 0/1 web root) or upstream's ``CVMFS_SERVER_URL``
        syntax: ``;``-separated ``http(s)://host/cvmfs/<fqrn>`` prefixes, tried in order, with
        ``@fqrn@`` and ``@org@`` replaced. ``fqrn`` defaults to the manifest's ``N`` (folder) or
        the first URL's last component. ``proxy`` is ``CVMFS_HTTP_PROXY`` syntax (``;`` between
        groups, ``|`` within one, ``DIRECT``) or already parsed groups; none means DIRECT.
        ``public_key`` is a ``.pub`` file, a folder of them, ``a.pub:b.pub`` or loaded keys.
        ``cache`` is an :class:`ObjectCache` or a folder for one (limited to ``quota_bytes``).
        Fetcher settings (``timeout``, ``max_retries``, ``backoff_init``, ``pool_size``...) go to
        the :class:`~cvmfs_ml.client.fetcher.Fetcher`; the other options to :class:`Repository`.
        """
        source, fqrn, owned = open_source(location, fqrn, proxy, options)
        keys = load_keys(public_key)
        own_cache = isinstance(cache, (str, os.PathLike))
        if isinstance(cache, (str, os.PathLike)):
            cache = ObjectCache(Path(cache), quota_bytes)
        try:
            repository = cls(source, fqrn, public_keys=keys, cache=cache, **options)
            # What connect() created, close() closes; a caller's own source or cache is theirs.
            repository._owned = (*([source] if owned else []), *([cache] if own_cache else []))
            return repository
        except BaseException:
            close = getattr(source, "close", None) if owned else None
            if close is not None:
                close()
            if own_cache and isinstance(cache, ObjectCache):
                cache.close()
            raise

    open = connect
    """``Repository.open(location, ...)``: another name for :meth:`connect` (as ``tarfile.open``
    or ``fsspec.open`` name theirs). Files are opened with :meth:`open_file`, which takes a
    path only: one name, one meaning."""

    _owned: tuple[Any, ...] = ()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for catalogs in [self._catalogs, *getattr(self, "_retired", [])]:
                for catalog in catalogs.values():
                    catalog.close()
                catalogs.clear()
        if self._external is not None:
            self._external.close()
        for resource in self._owned:
            close = getattr(resource, "close", None)
            if close is not None:
                close()
        self._owned = ()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- revision: boot and refresh are RevisionRefresh's (.refresh) --------------------------
    @property
    def revision(self) -> int:
        return self.root.revision

    @property
    def loaded_catalogs(self) -> int:
        """Catalogs of the current tree loaded so far (upstream's ``user.nclg``)."""
        return len(self._catalogs)

    # -- objects ------------------------------------------------------------------------------
    @property
    def source(self) -> ObjectSource:
        """Where objects come from (a fetcher, a local folder, an object store)."""
        return self._source

    @source.setter
    def source(self, value: ObjectSource) -> None:
        self._source = value
        fetches = getattr(self, "_fetches", None)
        if fetches is not None:  # e.g. a test's counting wrapper around the real source
            fetches.source = value

    @property
    def max_unsized_object(self) -> int:
        """Bound on objects no catalog gives a size for (root catalog, history, meta-info)."""
        return self._fetches.max_unsized_object

    @max_unsized_object.setter
    def max_unsized_object(self, value: int) -> None:
        self._fetches.max_unsized_object = value

    def _object(
        self, digest: Digest, kind: ObjectKind, compressed: bool, size: int | None = None
    ) -> Path:
        """A verified, decompressed object in the cache (fetched once, even if asked twice)."""
        return self._fetches.get(digest, kind, compressed, size)[0]

    def load_catalog(self, mountpoint: str, digest: Digest, size: int | None = None) -> Catalog:
        """A catalog of this repository (any revision's) by hash: verified, opened once, kept
        open until :meth:`close` (``repo check`` walks every tagged tree with it)."""
        return self._load_catalog(mountpoint, digest, size)

    def _load_catalog(self, mountpoint: str, digest: Digest, size: int | None = None) -> Catalog:
        """A catalog, opened once; ``size`` (the parent's, if known and not 0) bounds it."""
        key = (mountpoint, digest.hex)
        with self._lock:
            catalog = self._catalogs.get(key)
            if catalog is not None:
                return catalog
        path = self._fetches.get(digest, ObjectKind.CATALOG, True, size, exact=False)[0]
        self.cache.pin(digest)
        # (Catalog checks its root_prefix against the mount point its parent gives)
        catalog = Catalog(path, mountpoint, what=f"catalog {digest.hex} ({mountpoint or '/'})")
        with self._lock:
            return self._catalogs.setdefault(key, catalog)

    # -- lookups ------------------------------------------------------------------------------
    def _catalog_for(self, path: str, *, for_listing: bool = False) -> Catalog:
        """The catalog holding ``path``'s entry (its own, for a listing of a mount point), walked
        to from the deepest catalog of this revision already walked to above ``path`` (found by
        parent folder): from the root every time, 800 nested catalogs took 17 s to list."""
        tree = self._tree
        start = path if for_listing else path[: path.rfind("/")]
        while (catalog := tree.get(start)) is None:
            start = start[: start.rfind("/")]
        while True:
            ref = catalog.find_nested(path)
            if ref is None or (ref.path == path and not for_listing):
                return catalog  # the parent's mount point row answers stat (§8.3 step 4)
            catalog = self._load_catalog(ref.path, ref.digest, ref.size)
            tree[ref.path] = catalog

    @staticmethod
    def _normalise(path: str) -> str:
        path = posixpath.normpath("/" + path.strip("/")) if path.strip("/") else ""
        return "" if path == "/" else path

    def stat(self, path: str) -> DirectoryEntry:
        """The entry at ``path`` (symlinks are not followed)."""
        path = self._normalise(path)
        entry = self._catalog_for(path).lookup(path)
        if entry is None:
            raise NotFoundError(path or "/", self.fqrn)
        return present(entry, self.symlink_variables)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except NotFoundError:
            return False

    def listdir(self, path: str = "") -> list[DirectoryEntry]:
        path = self._normalise(path)
        entry = self.stat(path)
        if not entry.is_dir:
            raise NotADirectoryError(20, "not a directory", path)
        entries = listed(self._catalog_for(path, for_listing=True).listing(path))
        return [present(e, self.symlink_variables) for e in entries]

    def walk(self, path: str = "") -> Iterator[DirectoryEntry]:
        """Every entry below ``path`` (depth first, names sorted), crossing nested catalogs."""
        stack = [self._normalise(path)]
        while stack:
            current = stack.pop()
            entries = self.listdir(current)
            yield from entries
            stack.extend(e.path for e in reversed(entries) if e.is_dir)

    def readlink(self, path: str) -> str:
        """A link's target as a mount shows it: variant links expanded, absolute ones as is."""
        entry = self.stat(path)
        if not entry.is_symlink:
            raise OSError(22, "not a symlink", path)
        return entry.symlink

    def raw_readlink(self, path: str) -> str:
        """A link's target as stored, ``$(VAR)`` unexpanded (upstream's ``user.rawlink``)."""
        path = self._normalise(path)
        entry = self._catalog_for(path).lookup(path)
        if entry is None:
            raise NotFoundError(path or "/", self.fqrn)
        if not entry.is_symlink:
            raise OSError(22, "not a symlink", path)
        return entry.symlink

    def lookup(self, path: str) -> DirectoryEntry:
        """The entry at ``path`` with links in its folders followed, not the last one (lstat)."""
        path = self._normalise(path)
        try:
            return self.stat(path)
        except NotFoundError:
            return resolve_path(self.stat, path, self.fqrn, follow_last=False)

    def resolve(self, path: str) -> DirectoryEntry:
        """``stat`` following symlinks in every component (aliases such as ``prod -> 1``).

        Targets are followed the way a mount at ``/cvmfs/<fqrn>`` follows them; a link that
        leads outside the repository raises :class:`~cvmfs_ml.errors.UnsafeInputError`.
        """
        path = self._normalise(path)
        try:
            entry = self.stat(path)
        except NotFoundError:
            entry = None  # a link in a parent folder, or really missing: walk it
        if entry is not None and not entry.is_symlink:
            return entry  # rows exist only below real folders: no link on the way
        return resolve_path(self.stat, path, self.fqrn)

    # -- file content -------------------------------------------------------------------------
    def layout(self, path: str | DirectoryEntry) -> FileLayout:
        entry = path if isinstance(path, DirectoryEntry) else self.resolve(path)
        if not entry.is_regular:
            raise IsADirectoryError(21, "not a regular file", entry.path)
        if entry.is_chunked:
            pieces = tuple(self._catalog_for(entry.path).chunks(entry))
        elif entry.digest is not None:
            pieces = (Chunk(0, entry.size, entry.digest),)
        else:
            raise FormatError(entry.path, "regular file without content hash or chunks")
        external = entry.path if entry.flags & Flag.EXTERNAL else None
        return FileLayout(entry.size, entry.is_compressed, pieces, entry.is_chunked, external)

    def piece_path(self, layout: FileLayout, index: int) -> Path:
        """The cached, verified bytes of piece ``index`` (fetching it if needed)."""
        return self.piece_fetch(layout, index)[0]

    def piece_fetch(self, layout: FileLayout, index: int) -> tuple[Path, str, int]:
        """:meth:`piece_path` and how it was served (``hit``/``fetch``/``wait``, net bytes)."""
        piece = layout.pieces[index]
        if layout.external is None:
            return self._fetches.get(piece.digest, layout.kind, layout.compressed, piece.size)
        source = self.external_source(layout.external)
        path = layout.external
        byte_range = (piece.offset, piece.size) if layout.chunked else None

        def fetch_external(sink: BinaryIO, max_bytes: int | None) -> int:
            return source.fetch_into(
                path, piece.digest, layout.compressed, sink, byte_range, max_bytes
            )

        return self._fetches.get(
            piece.digest, layout.kind, layout.compressed, piece.size, fetch_external
        )

    def external_source(self, path: str = "external file") -> ExternalSource:
        """The fetcher of external files (``CVMFS_EXTERNAL_URL``), created on first use."""
        with self._lock:
            if self._external is None:
                if not self.external_url:
                    raise external_unset(path)
                self._external = ExternalSource(
                    self.external_url, self.fqrn, proxy=self.external_proxy
                )
            return self._external

    def open_file(self, path: str, *, prefetch: bool | None = None) -> CvmfsFile:
        """A seekable binary file; large files are prefetched in parallel unless disabled.

        ``prefetch=None`` queues every piece of files of ``prefetch_min_bytes`` or more, else a
        read-ahead; a file over half of what the cache holds gets a window (:func:`fit_window`)."""
        entry = self.resolve(path)
        layout = self.layout(entry)
        handle = CvmfsFile(self, entry.path, layout)
        if prefetch or (prefetch is None and layout.size >= self.prefetch_min_bytes):
            quota = self.cache.capacity_bytes()  # a disk smaller than the quota limits it too
            if layout.size > quota // 2:
                fit_window(handle, quota)
            else:
                handle.prefetching = self.prefetch_layout(layout, path=entry.path)
                handle.prefetched = True
        return handle

    def read_bytes(self, path: str) -> bytes:
        with self.open_file(path, prefetch=False) as handle:
            return handle.read()

    # -- prefetch -----------------------------------------------------------------------------
    _prefetcher: Prefetcher | None = None
    readahead_pieces = 3
    """Pieces fetched ahead of a sequential reader of a file opened without full prefetch."""

    @property
    def prefetcher(self) -> Prefetcher:
        """The shared prefetch queue (its pool has ``prefetch_workers`` threads)."""
        prefetcher = self._prefetcher
        if prefetcher is None:
            with self._lock:
                if self._prefetcher is None:
                    self._prefetcher = Prefetcher(self, self._pool)
                prefetcher = self._prefetcher
        return prefetcher

    def prefetch_layout(
        self, layout: FileLayout, *, path: str | None = None
    ) -> list[Future[Fetched]]:
        """Queue every piece of a file on the shared pool (``path`` names it in traces)."""
        return self.prefetcher.fetch_pieces(layout, path=path, page_in=True)

    def prefetch(self, path: str, *, wait: bool = True) -> int:
        """Fetch every piece of a file, or of every file below a folder, in parallel.

        Returns the bytes covered (the files' sizes). :func:`cvmfs_ml.client.prefetch.warm`
        returns more detail and takes a concurrency.
        """
        return self.prefetcher.prefetch(path, wait_for=wait).bytes

    # -- tags ---------------------------------------------------------------------------------
    def tags(self) -> list[Tag]:
        if self.manifest.history is None:
            return []
        path = self._object(self.manifest.history, ObjectKind.HISTORY, True)
        with HistoryDb.open(path) as history:
            return list(history.tags())

    def tag(self, name: str) -> Tag | None:
        return next((t for t in self.tags() if t.name == name), None)
