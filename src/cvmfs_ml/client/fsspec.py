"""``cvmfs://<fqrn>/<path>``: repositories as an fsspec filesystem.

pandas, Hugging Face ``datasets``/``transformers`` and KServe read through fsspec, so exposing a
repository there makes every one of them a cvmfs-ml client without a mount. Paths are
``<fqrn>/<path inside the repository>`` (like ``bucket/key`` for object stores), so one
instance can read several repositories.

How a FQRN becomes a repository: by default through the client configuration (servers, proxies,
keys, cache: :func:`cvmfs_ml.client.locate.open_target`), or from storage options given for the
instance's own repository::

    fsspec.open("cvmfs://models.example.org/onnx/resnet/1/model.onnx")         # configuration
    fsspec.filesystem("cvmfs", server_url="http://s1.example.org/cvmfs/models.example.org",
                      public_key="/etc/cvmfs/keys/models.example.org.pub",
                      cache_storage="/tmp/c")

fsspec caches instances by their constructor arguments, so an instance is fully defined by
them: repositories are opened lazily, on first use, from those arguments alone (and pickling
an instance re-creates it from them). Files open as buffered views of
:class:`~cvmfs_ml.client.repository.CvmfsFile`: seeks are free, reads go to the local object
cache, and large files are prefetched in parallel when opened (``prefetch=False`` turns that
off, e.g. to read only a footer, leaving a read-ahead of a few pieces). No read holds more than
what it asked for: a whole-file ``read()`` or ``cat`` holds the file once. Paths follow links
in every component (aliases); ``walk``/``find`` list links to folders without entering them.
User guide: docs/fsspec.md.
"""

from __future__ import annotations

import datetime as dt
import difflib
import errno
import functools
import io
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from fsspec.spec import AbstractFileSystem

from cvmfs_ml.client.entries import device_number
from cvmfs_ml.client.locate import open_target, target_fqrn
from cvmfs_ml.client.repository import CvmfsFile, Repository
from cvmfs_ml.cvmfs.catalog import DirectoryEntry
from cvmfs_ml.errors import ConfigError, CvmfsMlError

__all__ = ["CvmfsBufferedFile", "CvmfsFileSystem"]

_DEFAULT_BLOCK = 1 << 20

log = logging.getLogger(__name__)


def _read_only(path: str) -> OSError:
    return OSError(errno.EROFS, "cvmfs:// is read-only", path)


class CvmfsBufferedFile(io.BufferedReader):
    """A buffered, seekable file with fsspec's usual attributes (``fs``, ``path``, ``size``)."""

    def __init__(self, raw: CvmfsFile, fs: CvmfsFileSystem, path: str, block_size: int) -> None:
        super().__init__(raw, buffer_size=max(block_size, io.DEFAULT_BUFFER_SIZE))
        self.fs = fs
        self.path = path
        self.size = raw.size

    @property
    def cvmfs_file(self) -> CvmfsFile:
        return self.raw  # type: ignore[return-value]

    def pread(self, size: int, offset: int) -> bytes:
        """Read at ``offset`` without moving the position (no buffer copy)."""
        return self.cvmfs_file.pread(size, offset)


_OPTIONS = ("fqrn", "server_url", "url", "public_key", "cache_storage", "cache", "proxy",
            "config", "tag", "prefetch", "block_size", "external_url")  # fmt: skip
_FSSPEC_OPTIONS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths",
                             "asynchronous", "loop", "skip_instance_cache"})  # fmt: skip
"""What :class:`~fsspec.spec.AbstractFileSystem` itself takes, for every filesystem."""


def _refuse_unknown(options: dict[str, Any]) -> None:
    """Refuse storage options neither we nor fsspec know: a typo (``server_ulr=``, ``repo=``)
    was dropped silently, and showed up only later as "cannot open repository"."""
    unknown = sorted(set(options) - _FSSPEC_OPTIONS)
    if not unknown:
        return
    hints = [
        f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
        for name in unknown
        for close in [difflib.get_close_matches(name, _OPTIONS, n=1, cutoff=0.6)]
    ]
    raise ConfigError(
        f"cvmfs: unknown storage option {', '.join(hints)}; the options are "
        f"{', '.join(_OPTIONS)} (docs/fsspec.md)"
    )


class CvmfsFileSystem(AbstractFileSystem):
    """Read-only fsspec filesystem over CernVM-FS repositories (protocol ``cvmfs``).

    Parameters (all optional, all part of the instance's identity; docs/fsspec.md):

    ``fqrn``          the repository ``server_url``/``public_key``/``proxy`` apply to
                      (taken from ``server_url`` when not given)
    ``server_url``    its location: ``http(s)://host/cvmfs/<fqrn>`` (``;`` list) or a local
                      repository folder; without it the configuration's ``CVMFS_SERVER_URL``
    ``public_key``    its master key file or folder (default: configuration's keys)
    ``cache_storage`` object cache folder (fsspec's name for a local cache; ``cache`` is the
                      same); default: the configuration's ``CVMFS_CACHE_BASE`` or a private one
    ``proxy``         upstream proxy syntax (``"http://p1:3128|http://p2:3128;DIRECT"``)
    ``config``        client configuration file(s) in upstream's syntax
    ``tag``           read this tag instead of the newest revision
    ``prefetch``      ``None``: prefetch files of 32 MiB or more when opened; ``True``/``False``
    ``block_size``    the read buffer of opened files (default 1 MiB)
    ``external_url``  ``CVMFS_EXTERNAL_URL`` for external files
    ``url``           the same as ``server_url``; it cannot be passed through
                      ``fsspec.open(..., url=...)`` (``url_to_fs`` has its own ``url``)
    """

    protocol = "cvmfs"
    root_marker = ""

    def __init__(
        self,
        fqrn: str | None = None,
        url: str | None = None,
        public_key: str | None = None,
        cache: str | None = None,
        proxy: str | None = None,
        config: str | list[str] | None = None,
        tag: str | None = None,
        prefetch: bool | None = None,
        server_url: str | None = None,
        cache_storage: str | None = None,
        block_size: int | None = None,
        external_url: str | None = None,
        **storage_options: Any,
    ) -> None:
        _refuse_unknown(storage_options)
        super().__init__(**storage_options)
        if url is not None and server_url is not None and url != server_url:
            raise ConfigError("cvmfs: give server_url or url, not both")
        url = url if url is not None else server_url
        if cache is not None and cache_storage is not None and cache != cache_storage:
            raise ConfigError("cvmfs: give cache_storage or cache, not both")
        cache = cache if cache is not None else cache_storage
        self.url = os.fspath(url) if url is not None else None
        self.fqrn = fqrn or (target_fqrn(self.url) if self.url else None)
        self.public_key = os.fspath(public_key) if public_key is not None else None
        self.cache = os.fspath(cache) if cache is not None else None
        self.block_size = block_size if block_size and block_size > 0 else _DEFAULT_BLOCK
        self.external_url = external_url
        self.proxy = proxy
        self.config_files = [config] if isinstance(config, (str, os.PathLike)) else config or []
        self.tag = tag
        self.prefetch = prefetch
        self._repos: dict[str, Repository] = {}
        self._repos_lock = threading.Lock()

    # -- paths --------------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = os.fspath(path) if not isinstance(path, str) else path
        if text.startswith("cvmfs://"):
            text = text[len("cvmfs://") :]
        elif text.startswith("cvmfs::"):
            text = text[len("cvmfs::") :]
        return text.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        text = path[len("cvmfs://") :] if path.startswith("cvmfs://") else ""
        host = text.split("/", 1)[0]
        return {"fqrn": host} if host else {}

    def unstrip_protocol(self, name: str) -> str:
        return "cvmfs://" + self._strip_protocol(name)

    def _split(self, path: str) -> tuple[str, str]:
        stripped = self._strip_protocol(path)
        fqrn, _, rel = stripped.partition("/")
        return fqrn, rel

    # -- repositories -------------------------------------------------------------------------
    def repository(self, fqrn: str | None = None) -> Repository:
        """The open repository for ``fqrn`` (default: the instance's own).

        A repository opened earlier looks for a new revision once its TTL has expired, as a
        mount does (:meth:`Repository.maybe_refresh`: a failed check keeps the current
        revision); files already open keep reading the revision they opened.
        """
        name = fqrn or self.fqrn
        if not name:
            raise FileNotFoundError(errno.ENOENT, "no repository named in the path", "")
        with self._repos_lock:
            repo = self._repos.get(name)
        if repo is not None:
            repo.maybe_refresh()
            return repo
        with self._repos_lock:
            repo = self._repos.get(name)
            if repo is not None:
                return repo
            own = name == self.fqrn
            try:
                repo = open_target(
                    self.url if own and self.url else name,
                    fqrn=name,  # verified against the manifest, whatever the location's name
                    public_key=self.public_key if own else None,
                    cache=self.cache,
                    proxy=self.proxy if own else None,
                    config_files=self.config_files,
                    tag=self.tag if own else None,
                    **({"external_url": self.external_url} if own and self.external_url else {}),
                )
            except ConfigError as exc:
                raise FileNotFoundError(
                    errno.ENOENT, f"cannot open repository {name}: {exc}", name
                ) from exc
            self._repos[name] = repo
            return repo

    def invalidate_cache(self, path: str | None = None) -> None:
        """Check for a new revision now (of ``path``'s repository, or of every open one).

        fsspec callers use this to say "show me what is there now". A check that fails (servers
        unreachable, an untrusted manifest) is logged and the current revision kept.
        """
        super().invalidate_cache(path)
        with self._repos_lock:
            if path is None:
                repos = list(self._repos.values())
            else:
                repo = self._repos.get(self._split(path)[0])
                repos = [repo] if repo is not None else []
        for repo in repos:
            try:
                repo.refresh()
            except (CvmfsMlError, OSError) as exc:
                log.warning("%s: staying on revision %d: %s", repo.fqrn, repo.revision, exc)

    def close(self) -> None:
        """Close the repositories opened so far (the instance stays usable)."""
        with self._repos_lock:
            repos, self._repos = list(self._repos.values()), {}
        for repo in repos:
            repo.close()

    # -- metadata -----------------------------------------------------------------------------
    def _describe(self, fqrn: str, repo: Repository, entry: DirectoryEntry) -> dict[str, Any]:
        name = f"{fqrn}{entry.path}" if entry.path else fqrn
        info: dict[str, Any] = {
            "name": name,
            "size": entry.size,
            "type": "directory" if entry.is_dir else "file",
            "mode": entry.mode,
            "mtime": entry.mtime,
            "uid": entry.uid,
            "gid": entry.gid,
            "nlink": entry.linkcount or 1,
            "hash": entry.digest.hex if entry.digest is not None else None,
            "chunked": entry.is_chunked,
            "islink": entry.is_symlink,
        }
        if entry.is_symlink:
            info["destination"] = entry.symlink
            try:
                target = repo.resolve(entry.path)
            except (CvmfsMlError, OSError):
                info.update(type="other", size=len(entry.symlink.encode()))
            else:
                info.update(
                    type="directory" if target.is_dir else "file" if target.is_regular else "other",
                    size=target.size if target.is_regular else 0,
                    hash=target.digest.hex if target.digest is not None else None,
                )
        elif entry.is_dir:
            info["size"] = 0
        elif not entry.is_regular:
            # devices keep their dev_t in the size column; they have no bytes (§4.3)
            info.update(type="other", size=0, rdev=device_number(entry))
        return info

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        fqrn, rel = self._split(path)
        if not fqrn:
            return {"name": "", "size": 0, "type": "directory"}
        repo = self.repository(fqrn)
        info = self._describe(fqrn, repo, repo.lookup(rel))
        info["name"] = f"{fqrn}/{rel}".rstrip("/")  # the name asked for, even through a link
        return info

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        fqrn, rel = self._split(path)
        if not fqrn:
            names = [self.fqrn] if self.fqrn else []
            infos = [{"name": n, "size": 0, "type": "directory"} for n in names]
            return infos if detail else names
        repo = self.repository(fqrn)
        entry = repo.resolve(rel)
        if not entry.is_dir:
            infos = [self.info(f"{fqrn}/{rel}")]
        else:
            infos = [self._describe(fqrn, repo, e) for e in repo.listdir(entry.path)]
            if entry.path != repo._normalise(rel):  # listed through a link: keep its name
                prefix = f"{fqrn}/{rel}".rstrip("/")
                for info in infos:
                    info["name"] = f"{prefix}/{info['name'].rsplit('/', 1)[-1]}"
        if not kwargs.get("enter_links", True):
            for info in infos:
                if info.get("islink") and info["type"] == "directory":
                    info["type"] = "other"  # listed, not entered (see walk)
        return infos if detail else [i["name"] for i in infos]

    def walk(
        self,
        path: str,
        maxdepth: int | None = None,
        topdown: bool = True,
        on_error: str = "omit",
        **kwargs: Any,
    ) -> Any:
        """fsspec's walk (and so ``find``, ``du``, ``get(recursive=True)``), as ``os.walk``
        does it: links to folders are listed but not entered. An alias (``prod -> 1``) would
        otherwise list a version once per alias, and a link to a parent would never end.

        fsspec's own walk recurses once per level, so a tree deeper than Python's recursion
        limit (a tarball anyone with a token can publish) ended in ``RecursionError``; here it
        asks fsspec for one level at a time and keeps the levels on a stack. The order, the
        pruning of ``dirs`` by a top-down caller and ``maxdepth`` are fsspec's.
        """
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        kwargs.setdefault("enter_links", False)
        one_level = functools.partial(
            super().walk, maxdepth=1, topdown=True, on_error=on_error, **kwargs
        )
        entry = next(one_level(path), None)
        stack: list[tuple[Any, Iterator[str]]] = []  # each level above, and its folders to visit
        while entry is not None or stack:
            if entry is not None:
                if topdown:
                    yield entry  # the caller may prune entry[1] before we go on
                deeper = maxdepth is None or len(stack) + 1 < maxdepth
                stack.append((entry, iter(list(entry[1]) if deeper else [])))
                entry = None
                continue
            level, folders = stack[-1]
            name = next(folders, None)
            if name is None:
                stack.pop()
                if not topdown:
                    yield level
                continue
            entry = next(one_level(f"{level[0]}/{name}" if level[0] else name), None)

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    def ukey(self, path: str) -> str:
        info = self.info(path)
        if info.get("hash"):
            return str(info["hash"])
        return f"{info['name']}@{self.repository(self._split(path)[0]).revision}"

    def checksum(self, path: str) -> int:
        return int(self.ukey(path).encode().hex()[:32], 16)

    def modified(self, path: str) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.info(path).get("mtime", 0), tz=dt.UTC)

    def created(self, path: str) -> dt.datetime:
        return self.modified(path)

    # -- content ------------------------------------------------------------------------------
    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        prefetch: bool | None = None,
        **kwargs: Any,
    ) -> CvmfsBufferedFile:
        if mode != "rb":
            raise _read_only(path)
        fqrn, rel = self._split(path)
        if not fqrn:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        repo = self.repository(fqrn)
        raw = repo.open_file(rel, prefetch=self.prefetch if prefetch is None else prefetch)
        size = block_size if block_size and block_size > 0 else self.block_size
        return CvmfsBufferedFile(raw, self, self._strip_protocol(path), size)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        fqrn, rel = self._split(path)
        if not fqrn:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        repo = self.repository(fqrn)
        wants_all = start in (None, 0) and end is None
        prefetch = self.prefetch if wants_all else False
        with repo.open_file(rel, prefetch=prefetch) as handle:
            size = handle.size
            first = 0 if start is None else (start if start >= 0 else max(0, size + start))
            last = size if end is None else (end if end >= 0 else size + end)
            last = min(last, size)
            return handle.pread(max(0, last - first), first) if last > first else b""

    # -- read-only ----------------------------------------------------------------------------
    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        raise _read_only(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        raise _read_only(path)

    def rmdir(self, path: str) -> None:
        raise _read_only(path)

    def rm_file(self, path: str) -> None:
        raise _read_only(path)

    def _rm(self, path: str) -> None:
        raise _read_only(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        raise _read_only(str(path))

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        raise _read_only(path2)

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        raise _read_only(str(path2))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        raise _read_only(path)

    def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> None:
        raise _read_only(rpath)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        raise _read_only(path)
