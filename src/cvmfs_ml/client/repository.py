"""The read API: open a repository, trust it, and read its tree (cvmfs-format.md §8.3, §10).

Boot follows upstream's order: manifest -> certificate -> manifest signature -> whitelist (expiry,
name, master-key signature, certificate fingerprint) -> root catalog. Every object is checked
against its hash before use; catalogs and file chunks are kept decompressed in an
:class:`~cvmfs_ml.client.cache.ObjectCache`; nested catalogs load on demand.

The same class reads a local repository folder (:class:`~cvmfs_ml.storage.local.LocalStore`) and
an HTTP one (:class:`~cvmfs_ml.client.fetcher.Fetcher`): both offer ``fetch`` and ``fetch_into``.
"""

from __future__ import annotations

import bisect
import datetime as dt
import io
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.cvmfs.catalog import Catalog, Chunk, DirectoryEntry
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.history import HistoryDb, Tag
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.cvmfs.manifest import Manifest, verify_manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.cvmfs.whitelist import Whitelist, verify_whitelist
from cvmfs_ml.errors import (
    CvmfsMlError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RollbackError,
    SignatureError,
)

__all__ = ["CvmfsFile", "FileLayout", "ObjectSource", "Repository"]

_MAX_SYMLINK_DEPTH = 32


class ObjectSource(Protocol):
    """Where objects come from: a local store or the HTTP fetcher."""

    def fetch(self, rel_path: str, expected: Digest | None, *, compressed: bool) -> bytes: ...

    def fetch_into(
        self, rel_path: str, expected: Digest | None, compressed: bool, fileobj: BinaryIO
    ) -> int: ...


@dataclass(frozen=True)
class FileLayout:
    """How a regular file's bytes are stored: pieces with their objects and compression."""

    size: int
    compressed: bool
    pieces: tuple[Chunk, ...]  # a whole-file object is one piece at offset 0
    chunked: bool = False  # pieces are ``P`` objects

    @property
    def kind(self) -> ObjectKind:
        return ObjectKind.PARTIAL if self.chunked else ObjectKind.FILE

    @property
    def offsets(self) -> list[int]:
        return [p.offset for p in self.pieces]


class _ClassOrInstance:
    """``open`` on the class connects to a repository; on an instance it opens a file.

    Both spellings are part of the documented API (``Repository.open(url, fqrn, key)`` and
    ``repo.open(path)``), so one name dispatches on how it is reached.
    """

    def __init__(self, for_class: Any, for_instance: Any) -> None:
        self._for_class = for_class
        self._for_instance = for_instance

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self._for_class.__get__(owner, owner)
        return self._for_instance.__get__(obj, owner)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Repository:
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
    ) -> None:
        self.source = source
        self.fqrn = fqrn
        self._public_keys = list(public_keys)
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
        self._inflight: dict[Digest, Future[Path]] = {}
        self.prefetch_min_bytes = prefetch_min_bytes
        self.tracer = tracer
        self.manifest = self._boot()
        self.root_hash = self.manifest.catalog
        if tag is not None:
            found = self.tag(tag)
            if found is None:
                raise NotFoundError(f"tag {tag}", fqrn)
            root_hash = found.root_catalog
        if root_hash is not None:
            self.root_hash = root_hash
        self.root = self._load_catalog("", self.root_hash)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        location: str | os.PathLike[str],
        fqrn: str | None = None,
        public_key: str | os.PathLike[str] | Sequence[Any] | None = None,
        *,
        cache: ObjectCache | str | os.PathLike[str] | None = None,
        proxy: str | None = None,
        **options: Any,
    ) -> Repository:
        """Open a local repository folder or an ``http(s)://.../cvmfs/<fqrn>`` URL (``;`` list)."""
        text = os.fspath(location)
        if isinstance(cache, (str, os.PathLike)):
            cache = ObjectCache(Path(cache), None)
        if text.startswith(("http://", "https://")):
            from cvmfs_ml.client.fetcher import Fetcher

            urls = [u.rstrip("/") for u in text.split(";") if u]
            fqrn = fqrn or urls[0].rsplit("/", 1)[-1]
            urls = [u.replace("@fqrn@", fqrn) for u in urls]
            groups = _proxy_groups(proxy)
            source: ObjectSource = Fetcher(urls, groups)
        else:
            from cvmfs_ml.storage.local import LocalStore

            folder = Path(text)
            source = LocalStore(folder)
            fqrn = fqrn or _manifest_fqrn(folder) or folder.name
        keys: Sequence[Any]
        if public_key is None:
            keys = []
        elif isinstance(public_key, (str, os.PathLike)):
            keys = load_public_keys(public_key)
        else:
            keys = list(public_key)
        return cls(source, fqrn, public_keys=keys, cache=cache, **options)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for catalog in self._catalogs.values():
                catalog.close()
            self._catalogs.clear()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- trust --------------------------------------------------------------------------------
    def _boot(self) -> Manifest:
        raw = self.source.fetch(".cvmfspublished", None, compressed=False)
        manifest = Manifest.parse(raw)
        if manifest.fqrn is not None and manifest.fqrn != self.fqrn:
            raise SignatureError(f".cvmfspublished is for {manifest.fqrn!r}, not {self.fqrn!r}")
        if not self._verify:
            return manifest
        if manifest.certificate is None:
            raise FormatError(".cvmfspublished", "no certificate (X) to verify the signature")
        certificate = self.source.fetch(
            object_path(manifest.certificate, ObjectKind.CERTIFICATE),
            manifest.certificate,
            compressed=True,
        )
        verify_manifest(raw, certificate, fqrn=self.fqrn)
        if not self._public_keys:
            raise SignatureError(
                f"no public master key for {self.fqrn}: pass --key (the <fqrn>.pub file)"
            )
        whitelist_raw = self.source.fetch(".cvmfswhitelist", None, compressed=False)
        self.whitelist: Whitelist = verify_whitelist(
            whitelist_raw, self._public_keys, self.fqrn, self._now or _utcnow()
        )
        if not self.whitelist.accepts(certificate):
            raise SignatureError(f"the certificate of {self.fqrn} is not listed in .cvmfswhitelist")
        self._check_breadcrumb(manifest)
        return manifest

    def _breadcrumb_path(self) -> Path:
        return Path(self.cache.root) / f"cvmfschecksum.{self.fqrn}"

    def _check_breadcrumb(self, manifest: Manifest) -> None:
        """Refuse a manifest older than one already accepted (upstream's breadcrumb, §10.2)."""
        path = self._breadcrumb_path()
        try:
            text = path.read_text().strip()
            _hash, _, rest = text.partition("T")
            stamp, _, revision = rest.partition("R")
            known_ts, known_rev = int(stamp), int(revision)
        except (OSError, ValueError):
            known_ts = known_rev = -1
        if manifest.revision < known_rev or manifest.timestamp < known_ts:
            raise RollbackError(
                f"{self.fqrn}: server offers revision {manifest.revision} (T={manifest.timestamp})"
                f" but revision {known_rev} (T={known_ts}) was already seen"
            )
        text = f"{manifest.catalog.hex}T{manifest.timestamp}R{manifest.revision}"
        tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache still reads; it only loses rollback protection

    def refresh(self) -> bool:
        """Re-read the manifest; switch to a newer revision. Returns True if it changed."""
        manifest = self._boot()
        if manifest.catalog == self.root_hash:
            return False
        with self._lock:
            self.manifest = manifest
            self.root_hash = manifest.catalog
            self.root = self._load_catalog("", manifest.catalog)
        return True

    @property
    def revision(self) -> int:
        return self.root.revision

    # -- objects ------------------------------------------------------------------------------
    def _object(self, digest: Digest, kind: ObjectKind, compressed: bool) -> Path:
        """A verified, decompressed object in the cache (fetched once, even if asked twice)."""
        path = self.cache.get_path(digest)
        if path is not None:
            return path
        with self._lock:
            future = self._inflight.get(digest)
            owner = future is None
            if owner:
                future = Future()
                self._inflight[digest] = future
        assert future is not None
        if not owner:
            return future.result()
        try:
            with self.cache.put_stream(digest) as sink:
                self.source.fetch_into(object_path(digest, kind), digest, compressed, sink)
            path = self.cache.get_path(digest)
            if path is None:
                raise IntegrityError(f"cache entry {digest.hex}", "stored", "missing")
            future.set_result(path)
            return path
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(digest, None)

    def _load_catalog(self, mountpoint: str, digest: Digest) -> Catalog:
        key = (mountpoint, digest.hex)
        with self._lock:
            catalog = self._catalogs.get(key)
            if catalog is not None:
                return catalog
        path = self._object(digest, ObjectKind.CATALOG, True)
        self.cache.pin(digest)
        catalog = Catalog(path, mountpoint, what=f"catalog {digest.hex} ({mountpoint or '/'})")
        if mountpoint and catalog.mountpoint != mountpoint:
            raise FormatError(catalog.what, f"root_prefix {catalog.mountpoint!r} != {mountpoint!r}")
        with self._lock:
            return self._catalogs.setdefault(key, catalog)

    # -- lookups ------------------------------------------------------------------------------
    def _catalog_for(self, path: str, *, for_listing: bool = False) -> Catalog:
        catalog = self.root
        while True:
            ref = catalog.find_nested(path)
            if ref is None:
                return catalog
            if ref.path == path and not for_listing:
                return catalog  # the parent's mount point row answers stat (§8.3 step 4)
            catalog = self._load_catalog(ref.path, ref.digest)

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
        return entry

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
        return self._catalog_for(path, for_listing=True).listing(path)

    def walk(self, path: str = "") -> Iterator[DirectoryEntry]:
        """Every entry below ``path`` (depth first, names sorted), crossing nested catalogs."""
        stack = [self._normalise(path)]
        while stack:
            current = stack.pop()
            entries = self.listdir(current)
            for entry in entries:
                yield entry
            stack.extend(e.path for e in reversed(entries) if e.is_dir)

    def readlink(self, path: str) -> str:
        entry = self.stat(path)
        if not entry.is_symlink:
            raise OSError(22, "not a symlink", path)
        return entry.symlink

    def resolve(self, path: str) -> DirectoryEntry:
        """``stat`` following symlinks that stay inside the repository."""
        path = self._normalise(path)
        for _ in range(_MAX_SYMLINK_DEPTH):
            entry = self.stat(path)
            if not entry.is_symlink:
                return entry
            target = entry.symlink
            base = posixpath.dirname(path) if not target.startswith("/") else ""
            path = self._normalise(posixpath.join(base or "/", target))
        raise OSError(40, "too many levels of symbolic links", path)

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
        return FileLayout(entry.size, entry.is_compressed, pieces, entry.is_chunked)

    def piece_path(self, layout: FileLayout, index: int) -> Path:
        """The cached, verified bytes of piece ``index`` (fetching it if needed)."""
        return self._object(layout.pieces[index].digest, layout.kind, layout.compressed)

    def open_file(self, path: str, *, prefetch: bool | None = None) -> CvmfsFile:
        """A seekable binary file; large files are prefetched in parallel unless disabled."""
        entry = self.resolve(path)
        layout = self.layout(entry)
        handle = CvmfsFile(self, entry.path, layout)
        if prefetch or (prefetch is None and layout.size >= self.prefetch_min_bytes):
            self.prefetch_layout(layout)
        return handle

    def read_bytes(self, path: str) -> bytes:
        with self.open_file(path, prefetch=False) as handle:
            return handle.read()

    def prefetch_layout(self, layout: FileLayout) -> list[Future[Path]]:
        return [
            self._pool.submit(self.piece_path, layout, i)
            for i in range(len(layout.pieces))
            if self.cache.get_path(layout.pieces[i].digest) is None
        ]

    def prefetch(self, path: str, *, wait: bool = True) -> int:
        """Fetch every piece of a file, or of every file below a folder, in parallel."""
        entry = self.resolve(path)
        entries = (
            [entry] if entry.is_regular else [e for e in self.walk(entry.path) if e.is_regular]
        )
        futures: list[Future[Path]] = []
        total = 0
        for item in entries:
            layout = self.layout(item)
            futures += self.prefetch_layout(layout)
            total += layout.size
        if wait:
            for future in futures:
                future.result()
        return total

    open = _ClassOrInstance(connect, open_file)
    """``Repository.open(location, ...)`` connects; ``repo.open(path)`` opens a file."""

    # -- tags ---------------------------------------------------------------------------------
    def tags(self) -> list[Tag]:
        if self.manifest.history is None:
            return []
        path = self._object(self.manifest.history, ObjectKind.HISTORY, True)
        with HistoryDb.open(path) as history:
            return list(history.tags())

    def tag(self, name: str) -> Tag | None:
        return next((t for t in self.tags() if t.name == name), None)


class CvmfsFile(io.RawIOBase):
    """A read-only, seekable view of one file; pieces come from the cache, fetched lazily."""

    def __init__(self, repository: Repository, path: str, layout: FileLayout) -> None:
        super().__init__()
        self.repository = repository
        self.name = path
        self.layout = layout
        self._offsets = layout.offsets
        self._pos = 0
        self._fds: dict[int, int] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self.layout.size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.layout.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            path = self.repository.piece_path(self.layout, index)
            fd = os.open(path, os.O_RDONLY)
            if len(self._fds) >= 8:  # keep a few pieces open for sequential readers
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[index] = fd
        return fd

    def pread(self, size: int, offset: int) -> bytes:
        """Read ``size`` bytes at ``offset`` without moving the position (FUSE, fsspec)."""
        out = bytearray()
        end = min(offset + size, self.layout.size)
        started = time.monotonic()
        while offset < end:
            index = bisect.bisect_right(self._offsets, offset) - 1
            piece = self.layout.pieces[index]
            within = offset - piece.offset
            want = min(end - offset, piece.size - within)
            data = os.pread(self._fd(index), want, within)
            if len(data) != want:
                self.repository.cache.invalidate(piece.digest)
                self._fds.pop(index, None)
                raise IntegrityError(
                    f"{self.name} piece {index}", f"{want} bytes", f"{len(data)} bytes"
                )
            out += data
            offset += want
        if self.repository.tracer is not None:
            self.repository.tracer.record(
                self.name, offset - len(out), len(out), time.monotonic() - started
            )
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.pread(len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        data = self.pread(max(0, self.layout.size - self._pos), self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        super().close()


def _manifest_fqrn(folder: Path) -> str | None:
    try:
        return Manifest.parse((folder / ".cvmfspublished").read_bytes()).fqrn
    except (OSError, CvmfsMlError):
        return None


def _proxy_groups(proxy: str | None) -> list[list[str]]:
    if not proxy:
        return [["DIRECT"]]
    return [
        [p.strip() for p in group.split("|") if p.strip()]
        for group in proxy.split(";")
        if group.strip()
    ]
