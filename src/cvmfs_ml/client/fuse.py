"""Mount a repository read-only with FUSE, so any program (onnxruntime, ``cat``, ``cp``) reads it.

The data path follows performance-notes.md (takeaways 1 and 4, §6):

* **Kernel page cache kept.** Files open with ``keep_cache`` and never ``direct_io`` (not even
  when the catalog's ``0x10000`` flag asks for it: re-reads would bypass the cache and
  ``MAP_SHARED`` mmaps could fail). An inode stands for one entry of one revision: when a
  new revision changes a path, the path gets a new inode (``fuse_live``), so an inode's
  attributes and pages never change and the cache stays valid; entry and attribute timeouts
  are long for the same reason, and the kernel is told explicitly what a new revision changed.
* **Large requests.** libfuse 3 negotiates ``max_pages`` = 256 (1 MiB) by itself; how much
  the kernel asks for at a time is the mount's readahead, 128 KiB by default. The daemon raises
  ``/sys/class/bdi/<major:minor>/read_ahead_kb`` to 1024 after mounting (root only,
  best-effort), which turns mmap faults and buffered reads into 1 MiB requests. (8192 was
  measured worse for warm reads: requests then run ahead of the pieces paged in from disk and
  more of them wait in worker threads.)
* **Reads of cached pieces in the page cache are answered on the event loop** (one
  ``preadv(RWF_NOWAIT)`` on a cache file, :meth:`CvmfsFile.pread_nowait`); a read that would
  wait for the disk, a lookup or a fetch runs on a worker thread, so the loop keeps answering.
  Opening a large file queues all its pieces on the repository's prefetch pool, and a
  sequential reader's handle pages the next cached pieces in from disk ahead of it
  (:mod:`cvmfs_ml.client.files`). Where the time goes is counted in
  :data:`~cvmfs_ml.client.readprofile.READ_PROFILE` (``cvmfs-ml stats``: ``read_profile``).

Errors map to errno at this edge: missing paths ``ENOENT``, ``ENOTDIR``, ``EISDIR``, writes
``EROFS``, and anything wrong with the data (hash mismatch, unreachable servers, bad
signatures) ``EIO``, which is what a reader should see instead of wrong bytes.

Magic extended attributes, like upstream's (``getfattr -d -m - FILE``): ``user.hash``,
``user.chunks``, ``user.chunk_list``, ``user.compression``, ``user.rawlink`` per entry, and
the mount-wide ones of :func:`cvmfs_ml.client.mount_control.upstream_magic` (``user.fqrn``,
``user.revision``, ``user.root_hash``, ``user.host``, ``user.expires``, ...), plus the xattrs
stored in the catalog. Reading the hidden ``user.cvmfs_ml.warm`` of a folder makes the daemon
fetch everything below it (``cvmfs-ml warm MOUNTED_PATH`` uses it); ``user.cvmfs_ml.reload``
and ``user.cvmfs_ml.stats`` of the root serve ``cvmfs-ml reload`` and ``cvmfs-ml stats``.

New revisions are taken on the TTL (:mod:`cvmfs_ml.client.fuse_live`).
:func:`cvmfs_ml.client.mounts.mount` starts :mod:`cvmfs_ml.client.fuse_daemon`, which serves
these operations, as a daemon process (pyfuse3 keeps one mount per process and readers should
not share the daemon's GIL) and returns once the mount answers; ``MountHandle.unmount()`` (or
``fusermount3 -u``) ends it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cvmfs_ml.client.entries import device_number, hardlink_key
from cvmfs_ml.client.fuse_live import LiveUpdates, TreeChanges, entry_name
from cvmfs_ml.client.inode_table import InodeTable
from cvmfs_ml.client.mount_control import (
    CONTROL_XATTRS,
    RELOAD_XATTR,
    MountCounters,
    control_reply,
    may_reload,
    mount_stats,
    upstream_magic,
)
from cvmfs_ml.client.mounts import (
    MountHandle,
    is_mounted,
    mount,
    set_readahead,
    unmount,
)
from cvmfs_ml.client.page_push import push_when_fetched, pushed
from cvmfs_ml.client.prefetch import warm
from cvmfs_ml.client.readprofile import READ_PROFILE
from cvmfs_ml.client.repository import CvmfsFile, Repository
from cvmfs_ml.cvmfs.catalog import DirectoryEntry
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.errors import ConfigError, CvmfsMlError, NotFoundError

__all__ = [
    "CvmfsOperations",
    "MountHandle",
    "is_mounted",
    "mount",
    "require_pyfuse3",
    "set_readahead",
    "unmount",
]

log = logging.getLogger("cvmfs_ml.fuse")

ATTR_TIMEOUT = 3600.0
"""Seconds the kernel may keep entries and attributes: what a new revision changes is
invalidated explicitly, and an inode's entry never changes."""
BLKSIZE = 1 << 20
NAME_MAX = 255  # bytes of one name: the kernel looks up no longer one
_KEEP_BUFFERS = 8  # idle reply buffers kept for reuse (1 MiB each)
WARM_XATTR = b"user.cvmfs_ml.warm"
STATS_XATTR = b"user.cvmfs_ml.read_sizes"
T = TypeVar("T")


def _errno_of(exc: BaseException, *, missing: int = errno.ENOENT) -> int:
    """The errno a reader sees for an exception raised while serving a request."""
    if isinstance(exc, NotFoundError | FileNotFoundError):
        return missing
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, IsADirectoryError):
        return errno.EISDIR
    if isinstance(exc, CvmfsMlError):
        return errno.EIO  # bad hash, bad signature, unreachable servers: never wrong bytes
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _reachable(children: list[DirectoryEntry], path: str) -> list[DirectoryEntry]:
    """The entries a listing can show: no lookup of a name over NAME_MAX reaches us, and one
    over 1024 bytes makes the kernel refuse the whole listing (a hostile catalog's)."""
    long = [child for child in children if len(_encode(child.name)) > NAME_MAX]
    if not long:
        return children
    log.error("listdir %s: %d names longer than %d bytes left out (the first starts %r)",
              path or "/", len(long), NAME_MAX, long[0].name[:40])  # fmt: skip
    return [child for child in children if len(_encode(child.name)) <= NAME_MAX]


# ------------------------------------------------------------------------------ operations
try:
    import pyfuse3 as _pyfuse3

    _OperationsBase: type = _pyfuse3.Operations
except ImportError:  # pragma: no cover - mount() reports it; the rest of the module works
    _pyfuse3 = None
    _OperationsBase = object


def require_pyfuse3() -> Any:
    if _pyfuse3 is None:
        raise ConfigError("FUSE mounts need pyfuse3 and trio: pip install 'cvmfs-ml[fuse]'")
    return _pyfuse3


class CvmfsOperations(_OperationsBase):  # type: ignore[misc,valid-type]
    """pyfuse3 low-level operations over a :class:`Repository` and the revisions it takes.

    Inodes are handed out per path on first sight; a path keeps its inode until a new revision
    changes its entry (then it gets a new one and the old inode serves only files opened
    before). All state changes happen on the trio loop; repository calls that may block run in
    worker threads.
    """

    enable_writeback_cache = False
    supports_dot_lookup = True

    max_missing = 8192
    """Names answered "does not exist" remembered to invalidate after a switch; beyond this
    many, such answers are cached by the kernel for one TTL only."""

    def __init__(
        self, repository: Repository, *, workers: int = 16, tag: str | None = None
    ) -> None:
        import trio

        pyfuse3 = require_pyfuse3()
        super().__init__()
        self._fuse = pyfuse3
        self._trio = trio
        self.repo = repository
        self._limiter = trio.CapacityLimiter(max(2, workers))
        self.inodes = InodeTable(pyfuse3.ROOT_INODE)
        self._files: dict[int, CvmfsFile] = {}
        # Open directory handles share the listing of one directory at one revision: a listing
        # of 300,000 entries is about 150 MB, and every process that lists it opens a handle.
        self._dirs: dict[int, tuple[str, Digest]] = {}
        self._listings: dict[tuple[str, Digest], tuple[list[DirectoryEntry], int]] = {}
        self._next_fh = 1
        self.reads = 0
        self.read_sizes: dict[int, int] = {}
        self._free_buffers: list[bytearray] = []
        self._lent_buffers: list[bytearray] = []
        self._missing: dict[tuple[int, str], None] = {}
        self.counters = MountCounters()
        self.tag = tag
        self.live = LiveUpdates(self, pyfuse3.invalidate_entry, pyfuse3.invalidate_inode)

    # -- helpers ------------------------------------------------------------------------------
    def _reply_buffer(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes for a read's answer, reused across reads.

        pyfuse3 copies a read's answer to the kernel as soon as the handler returns, before
        any other task runs on the loop, so a buffer lent to a read that has returned is free
        again when the next read starts. Reused buffers keep their pages mapped, where a fresh
        1 MiB ``bytes`` per request (what ``pread`` returns) costs an allocation and page
        faults, and a read across two pieces needs no join.
        """
        free = self._free_buffers
        if self._lent_buffers:
            free.extend(self._lent_buffers)
            self._lent_buffers.clear()
            del free[_KEEP_BUFFERS:]
        while free:
            buffer = free.pop()
            if len(buffer) >= size:
                return buffer
        return bytearray(max(size, BLKSIZE))

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        return await self._trio.to_thread.run_sync(func, *args, limiter=self._limiter)

    def _fail(self, exc: BaseException, what: str, *, missing: int = errno.ENOENT) -> Exception:
        if isinstance(exc, self._fuse.FUSEError):
            return exc
        code = _errno_of(exc, missing=missing)
        if code == errno.EIO:
            self.counters.io_error()
            log.error("%s: %s: %s", what, type(exc).__name__, exc)
        else:
            log.debug("%s: %s", what, exc)
        return self._fuse.FUSEError(code)

    def _inode_for(self, path: str, entry: DirectoryEntry | None = None) -> int:
        """The inode of ``path``; members of a hard-link group share one, as upstream's do."""
        return self.inodes.inode_for(path, hardlink_key(entry) if entry is not None else None)

    def _path(self, inode: int) -> str:
        path = self.inodes.path(inode)
        if path is None:
            raise self._fuse.FUSEError(errno.ENOENT)
        return path

    async def _entry(self, inode: int) -> DirectoryEntry:
        entry = self.inodes.entry(inode)
        if entry is None:
            path = self._path(inode)
            try:
                entry = await self._blocking(self.repo.stat, path)
            except Exception as exc:
                raise self._fail(exc, f"stat {path or '/'}") from exc
            self.inodes.set_entry(inode, entry)
        return entry

    def _attributes(self, inode: int, entry: DirectoryEntry) -> Any:
        attr = self._fuse.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = entry.mode
        attr.st_nlink = max(1, entry.linkcount)
        attr.st_uid = entry.uid
        attr.st_gid = entry.gid
        attr.st_rdev = device_number(entry)
        size = 0 if attr.st_rdev else entry.size  # a device's size column holds its dev_t
        if entry.is_symlink:
            size = len(_encode(entry.symlink))
        attr.st_size = size
        attr.st_blksize = BLKSIZE
        attr.st_blocks = (size + 511) // 512
        mtime_ns = entry.mtime * 1_000_000_000 + (entry.mtimens or 0)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        return attr

    # -- metadata -----------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._path(parent_inode)
        if name in (b".", b".."):
            up = parent.rsplit("/", 1)[0] if parent else ""
            inode = parent_inode if name == b"." else self._inode_for(up)
            attributes = self._attributes(inode, await self._entry(inode))
            self.inodes.handed_out(inode)
            return attributes
        path = f"{parent}/{_decode(name)}"
        inode = self.inodes.current(path)
        entry = self.inodes.entry(inode) if inode is not None else None
        if entry is None:
            try:
                entry = await self._blocking(self.repo.stat, path)
            except (NotFoundError, FileNotFoundError, NotADirectoryError):
                return self._negative(parent_inode, path)
            except Exception as exc:
                raise self._fail(exc, f"lookup {path}") from exc
            inode = self._inode_for(path, entry)
            self.inodes.set_entry(inode, entry)
        self.inodes.handed_out(inode)
        return self._attributes(inode, entry)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    def _negative(self, parent_inode: int, path: str) -> Any:
        """A "does not exist" answer the kernel caches until the name appears (or one TTL)."""
        negative = self._fuse.EntryAttributes()
        negative.st_ino = 0
        negative.entry_timeout = ATTR_TIMEOUT
        if not self.repo.pinned:
            if len(self._missing) < self.max_missing:
                self._missing[(parent_inode, path)] = None
            else:
                negative.entry_timeout = min(ATTR_TIMEOUT, max(1.0, self.repo.ttl))
        return negative

    # -- live updates (cvmfs_ml.client.fuse_live) -----------------------------------------------
    def known_entries(self) -> list[tuple[str, int, DirectoryEntry | None]]:
        """``(path, inode, entry served)`` for every path the kernel may have cached."""
        return self.inodes.known()

    def missing_names(self) -> list[tuple[int, str]]:
        return list(self._missing)

    def adopt_changes(self, changes: TreeChanges) -> list[tuple[int, bytes] | int]:
        """Apply a switch to the inode table; what the kernel must forget.

        A path whose entry changed loses its inode (the next lookup hands out a new one), while
        the old inode keeps its entry for files still open; folders keep their inode with the
        new entry.
        """
        targets: list[tuple[int, bytes] | int] = []
        for path, inode in changes.renamed:
            self.inodes.detach(path, inode)
            parent = self.inodes.current(path.rsplit("/", 1)[0])
            if parent is not None:
                targets.append((parent, entry_name(path)))
        for inode, entry in changes.folders:
            self.inodes.set_entry(inode, entry)
            targets.append(inode)
        for parent, path in changes.appeared:
            self._missing.pop((parent, path), None)
            targets.append((parent, entry_name(path)))
        return targets

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attributes(inode, await self._entry(inode))

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        entry = await self._entry(inode)
        if not entry.is_symlink:
            raise self._fuse.FUSEError(errno.EINVAL)
        return _encode(entry.symlink)

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        entry = await self._entry(inode)
        if not entry.is_dir:
            raise self._fuse.FUSEError(errno.ENOTDIR)
        path = self._path(inode)
        key = (path, self.repo.root_hash)
        shared = self._listings.get(key)
        if shared is None:
            try:
                children = _reachable(await self._blocking(self.repo.listdir, path), path)
            except Exception as exc:
                raise self._fail(exc, f"listdir {path or '/'}") from exc
            shared = self._listings.get(key, (children, 0))  # or one listed meanwhile
            self.counters.dir_listings += 1
        self._listings[key] = (shared[0], shared[1] + 1)
        self.counters.dir_opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = key
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """Entries from ``start_id`` on, each given its inode as it is handed over (an inode
        the kernel refused now is dropped again: only a forget would remove it later)."""
        key = self._dirs.get(fh)
        listing = self._listings[key][0] if key is not None else []
        inodes = self.inodes
        for index in range(start_id, len(listing)):
            child = listing[index]
            inode = self._inode_for(child.path, child)
            entry = inodes.entry(inode)  # an inode keeps the entry it was first served with
            if entry is None:
                inodes.set_entry(inode, entry := child)
            attr = self._attributes(inode, entry)
            if not self._fuse.readdir_reply(token, _encode(child.name), attr, index + 1):
                inodes.drop_if_unknown(inode)
                break
            inodes.handed_out(inode)

    async def releasedir(self, fh: int) -> None:
        key = self._dirs.pop(fh, None)
        if key is None:
            return
        listing, users = self._listings[key]
        if users > 1:
            self._listings[key] = (listing, users - 1)
        else:
            del self._listings[key]

    async def statfs(self, ctx: Any = None) -> Any:
        data = self._fuse.StatvfsData()
        usage = None
        with contextlib.suppress(Exception):
            usage = self.repo.cache.usage()
        quota = self.repo.cache.quota_bytes
        used = int(getattr(usage, "size_bytes", 0) or 0)
        total = quota if quota else max(used, 1)
        data.f_bsize = BLKSIZE
        data.f_frsize = 4096
        data.f_blocks = total // 4096
        data.f_bfree = max(0, total - used) // 4096
        data.f_bavail = data.f_bfree
        data.f_files = len(self.inodes)
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = NAME_MAX
        return data

    # -- extended attributes ------------------------------------------------------------------
    def _magic(self, entry: DirectoryEntry) -> dict[bytes, Callable[[], bytes]]:
        repo = self.repo
        magic = upstream_magic(repo, self.live, self.counters, self.tag)
        magic[b"user.version"] = lambda: _version().encode()
        if entry.is_regular:
            layout = repo.layout(entry)
            if entry.digest is not None:
                magic[b"user.hash"] = lambda: entry.digest.hex.encode()  # type: ignore[union-attr]
            magic[b"user.chunks"] = lambda: str(len(layout.pieces)).encode()
            magic[b"user.chunk_list"] = lambda: "\n".join(
                f"{p.digest.hex},{p.offset},{p.size}" for p in layout.pieces
            ).encode()
            magic[b"user.compression"] = lambda: b"zlib" if layout.compressed else b"none"
        if entry.is_symlink:
            magic[b"user.rawlink"] = lambda: _encode(repo.raw_readlink(entry.path))
        return magic

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        entry = await self._entry(inode)
        try:
            magic = await self._blocking(self._magic, entry)
        except Exception as exc:
            raise self._fail(exc, f"listxattr {entry.path}") from exc
        names = list(magic) + [k for k in entry.xattrs if k not in magic]
        return names

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        entry = await self._entry(inode)
        if name == WARM_XATTR:
            try:
                result = await self._blocking(warm, self.repo, entry.path or "/")
            except Exception as exc:
                raise self._fail(exc, f"warm {entry.path or '/'}", missing=errno.EIO) from exc
            return (
                f"{result.files} {result.bytes} {result.fetched} {result.net_bytes}"
                f" {result.seconds:.3f}"
            ).encode()
        if name == STATS_XATTR:  # request-size histogram: shows whether reads are 1 MiB
            return json.dumps({"reads": self.reads, "sizes": self.read_sizes}).encode()
        if name in CONTROL_XATTRS and inode == self._fuse.ROOT_INODE:
            return await self._control(name, ctx)
        if name in entry.xattrs:
            return bytes(entry.xattrs[name])
        if not name.startswith(b"user."):
            # Every magic attribute is a user.* one. ``ls -l`` asks for security.selinux and
            # system.posix_acl_access of every file: answered here, not in a worker thread.
            raise self._fuse.FUSEError(self._fuse.ENOATTR)
        try:
            magic = await self._blocking(self._magic, entry)
            getter = magic.get(name)
            if getter is None:
                raise self._fuse.FUSEError(self._fuse.ENOATTR)
            return getter()
        except Exception as exc:
            raise self._fail(exc, f"getxattr {entry.path}") from exc

    async def _control(self, name: bytes, ctx: Any) -> bytes:
        """``cvmfs-ml reload`` and ``cvmfs-ml stats`` (cvmfs_ml.client.mount_control)."""
        if name == RELOAD_XATTR:
            if ctx is not None and not may_reload(ctx.uid):
                raise self._fuse.FUSEError(errno.EPERM)
            return control_reply(await self.live.check(forced=True))
        try:
            stats = mount_stats(self.repo, self.live, self.counters, len(self._files),
                                len(self.inodes))  # fmt: skip
        except Exception as exc:
            raise self._fail(exc, "stats") from exc
        stats["fuse"]["reads"] = self.reads
        stats["page_push"] = pushed()  # pieces stored in the page cache as fetched
        # The loop's own CPU time (this handler runs on it): with handler_seconds, how much of
        # the loop is our read code and how much pyfuse3 receiving requests and replying.
        stats["read_profile"] = {**READ_PROFILE.snapshot(),
                                 "loop_cpu_seconds": round(time.thread_time(), 6),
                                 "process_cpu_seconds": round(time.process_time(), 6)}  # fmt: skip
        return control_reply(stats)

    # -- file content -------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise self._fuse.FUSEError(errno.EROFS)
        entry = await self._entry(inode)
        if entry.is_dir:
            raise self._fuse.FUSEError(errno.EISDIR)
        if not entry.is_regular:
            raise self._fuse.FUSEError(errno.EACCES)
        path = self._path(inode)
        if self.inodes.current(path) != inode:  # an older revision's inode: its path moved on
            raise self._fuse.FUSEError(errno.ESTALE)
        self.counters.opens += 1
        try:
            handle = await self._blocking(self.repo.open_file, path)
        except Exception as exc:
            raise self._fail(exc, f"open {path}", missing=errno.EIO) from exc
        # What a reader has read sits in this file's page cache (keep_cache): the cache files'
        # copies of the pieces it has left behind are dropped, so a node holds a model once.
        handle.drop_behind = True
        if handle.prefetching:  # pieces fetched for it go straight into the page cache
            push_when_fetched(handle, inode, self._fuse.notify_store)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = handle
        # keep_cache: an inode's content never changes, so pages cached earlier stay valid.
        return self._fuse.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        started = time.perf_counter()
        handle = self._files.get(fh)
        if handle is None:
            raise self._fuse.FUSEError(errno.EBADF)
        self.reads += 1
        self.read_sizes[size] = self.read_sizes.get(size, 0) + 1
        # pyfuse3 replies from any buffer: the bytes go from the cache files straight into a
        # reused buffer (one copy, also across pieces) and from there to the kernel.
        buffer = self._reply_buffer(size)
        view = memoryview(buffer)[:size]
        try:
            # Open pieces whose bytes are in the page cache: answered here, no thread hop.
            # Anything that would wait for the disk or a fetch goes to a worker thread, so
            # the loop keeps answering the kernel's other requests meanwhile.
            n = handle.pread_nowait(view, off) if handle.is_open(size, off) else None
            if n is not None:
                READ_PROFILE.add(loop_reads=1, loop_bytes=n,
                                 loop_seconds=time.perf_counter() - started)  # fmt: skip
            else:
                if handle.is_open(size, off):
                    READ_PROFILE.add(nowait_misses=1)
                READ_PROFILE.add(handler_seconds=time.perf_counter() - started)
                thread_started = time.perf_counter()
                n = await self._blocking(handle.pread_into, view, off)
                started = time.perf_counter()
                READ_PROFILE.add(thread_reads=1, thread_bytes=n,
                                 thread_seconds=started - thread_started)  # fmt: skip
        except Exception as exc:
            raise self._fail(exc, f"read {handle.name} @{off}+{size}", missing=errno.EIO) from exc
        self._lent_buffers.append(buffer)  # free again once this answer has been sent
        READ_PROFILE.add(handler_seconds=time.perf_counter() - started)
        return view[:n]

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            handle.close()

    async def flush(self, fh: int) -> None:
        return None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cvmfs-ml")
    except Exception:  # not installed as a distribution
        return "unknown"
