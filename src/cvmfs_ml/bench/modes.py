"""Storage modes and cache states: the "where does the model come from" axis of the benchmark.

Every mode answers three questions for the runner, under one interface (:class:`StorageMode`):

* ``prepare(model, state)`` - put the caches into a :class:`CacheState` before a measurement
  (in the parent process, so the measured subprocess starts from exactly that state);
* ``access(model, scratch)`` - the ``access`` part of the worker spec: how the measured
  process reaches the files (see :mod:`cvmfs_ml.bench.worker`);
* ``settings()`` - what the report needs to say about the mode.

The modes:

======== ================================================================================
local     the model folder on local disk (the baseline every ratio is relative to)
fuse      a cvmfs-ml FUSE mount (``cvmfs-ml mount`` in its own process) of the published
          repository; the loader opens files on the mount
fsspec    the cvmfs-ml Python client (fsspec ``cvmfs`` filesystem): files are read into memory
          and the loader works from memory (ONNX external data via
          ``add_external_initializers_from_files_in_memory``)
get       ``cvmfs-ml model get`` without a mount: the client fetches every piece in parallel
          into its cache, verified, and hard-links (or copies) the files into a local folder,
          then the loader opens that folder
path      any mounted folder, e.g. an upstream ``/cvmfs/<repo>/<dir>`` (models at ROOT/<name>)
download  HTTP GET of every file to local disk, then load (KServe's storage initializer)
oci       ``oras pull`` of the model artifact from a local docker-registry, then load
======== ================================================================================

Cache states (issue 5 §3):

* ``cold`` - the client cache is wiped and the kernel page cache is dropped for the model
  files, the client cache and the mount (the FUSE daemon is restarted, which drops the mount's
  page cache and the daemon's memory);
* ``warm`` - the client cache holds the model (a previous run filled it), page caches dropped;
* ``hot``  - nothing dropped: the previous run left everything in memory.

Modes without a client cache (local disk, download, OCI pull) have no ``warm`` state; the
download and OCI modes fetch everything on every start by design, so they only have ``cold``.
The origin server's page cache is never dropped: a production Stratum 1 or registry keeps
popular objects in memory, and the benchmark measures the client side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from cvmfs_ml.bench.caches import drop_page_cache, wipe_cvmfs_ml_cache, wipe_upstream_cache
from cvmfs_ml.errors import ConfigError, CvmfsMlError

__all__ = [
    "MODES",
    "CacheState",
    "DownloadMode",
    "Endpoint",
    "FsspecMode",
    "FuseMode",
    "GetMode",
    "LocalMode",
    "ModeContext",
    "ModelFiles",
    "OciMode",
    "PathMode",
    "StorageMode",
    "make_mode",
]


class CacheState(StrEnum):
    """How much of the model is cached when a measurement starts (see the module docstring)."""

    COLD = "cold"
    WARM = "warm"
    HOT = "hot"


@dataclass(frozen=True)
class ModelFiles:
    """A generated model as the modes see it: a folder of files and how to load it."""

    name: str
    folder: Path  # the local copy (generated here)
    entry: str  # the file the runtime opens, relative to the folder
    files: tuple[str, ...]  # every file, relative
    runtime: str  # "onnxruntime" | "safetensors" | "torch" | "transformers"
    nbytes: int


@dataclass(frozen=True)
class Endpoint:
    """Where network modes find the published model (one per emulated network).

    ``repo_url`` is ``http://host:port/cvmfs/<fqrn>`` (the delay proxy's port when a WAN is
    emulated); ``plain_url`` serves the plain model folders (``<plain_url>/<model>/<file>``);
    ``proxy`` is a Squid URL clients go through, or None for direct access.
    """

    network: str
    repo_url: str
    fqrn: str
    public_key: Path
    plain_url: str | None = None
    proxy: str | None = None
    registry: str | None = None


@dataclass
class ModeContext:
    """What modes share: a work folder, the endpoint, and how page caches are dropped."""

    workdir: Path
    endpoint: Endpoint | None = None
    global_drop: bool = False
    log: Callable[[str], None] = field(default=lambda _msg: None)

    def drop(self, paths: Sequence[Path | str]) -> None:
        """Evict the page cache of ``paths`` (per file; machine-wide with ``global_drop``)."""
        existing = [p for p in paths if os.path.exists(p)]
        if existing or self.global_drop:
            drop_page_cache(existing, global_drop=self.global_drop)

    @property
    def drop_method(self) -> str:
        return ("posix_fadvise(DONTNEED) per file + /proc/sys/vm/drop_caches"
                if self.global_drop else "posix_fadvise(DONTNEED) per file")


class StorageMode(ABC):
    """One way of getting model files to a loader (see the module docstring)."""

    name: ClassVar[str]
    states: ClassVar[tuple[CacheState, ...]] = (CacheState.COLD, CacheState.WARM, CacheState.HOT)
    needs_endpoint: ClassVar[bool] = False
    path_based: ClassVar[bool] = False  # the loader opens real files (residency can be read)

    def __init__(self) -> None:
        self.ctx: ModeContext | None = None

    def start(self, ctx: ModeContext) -> None:
        """Set up (called once per network); raise :class:`ConfigError` if impossible here."""
        if self.needs_endpoint and ctx.endpoint is None:
            raise ConfigError(f"storage mode {self.name} needs a served repository")
        self.ctx = ctx

    def stop(self) -> None:
        """Release what :meth:`start` set up (mounts, temporary folders)."""
        return None

    @abstractmethod
    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        """Bring caches into ``state`` for ``model`` right before a measurement."""

    @abstractmethod
    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        """The worker's ``access`` spec; ``scratch`` is an empty folder for this measurement."""

    def files_for_residency(self, model: ModelFiles) -> list[Path]:
        """The paths the loader opens (path-based modes), for mincore residency."""
        return []

    def after(self, model: ModelFiles, scratch: Path) -> None:
        """Clean up after a measurement (downloaded copies)."""
        return None

    def settings(self) -> dict[str, Any]:
        return {"mode": self.name, "states": [s.value for s in self.states]}

    @property
    def _ctx(self) -> ModeContext:
        if self.ctx is None:
            raise RuntimeError(f"storage mode {self.name} is not started")
        return self.ctx

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# --------------------------------------------------------------------------------------------
# file-system paths


class PathMode(StorageMode):
    """Models at ``root/<name>/`` on any mounted file system (an upstream ``/cvmfs`` mount).

    Cold runs ``cvmfs_config wipecache`` when the upstream client is installed (the files may
    come from it) and drops the page cache of the model files; warm only drops the page cache.
    """

    name = "path"
    path_based = True

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 wipe_upstream: bool = True) -> None:
        super().__init__()
        self.root = Path(root) if root is not None else None
        self.wipe_upstream = wipe_upstream

    def _folder(self, model: ModelFiles) -> Path:
        if self.root is None:
            raise ConfigError("the path mode needs a root folder (--mounted DIR)")
        return self.root / model.name

    def files_for_residency(self, model: ModelFiles) -> list[Path]:
        return [self._folder(model) / f for f in model.files]

    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        if state is CacheState.COLD and self.wipe_upstream:
            wipe_upstream_cache()
        if state is not CacheState.HOT:
            self._ctx.drop(self.files_for_residency(model))

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        return {"kind": "path", "root": str(self._folder(model))}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "root": str(self.root)}


class LocalMode(PathMode):
    """The generated folder itself, on local disk: the baseline."""

    name = "local"
    states = (CacheState.COLD, CacheState.HOT)

    def __init__(self) -> None:
        super().__init__(None, wipe_upstream=False)

    def _folder(self, model: ModelFiles) -> Path:
        return model.folder


# --------------------------------------------------------------------------------------------
# cvmfs-ml clients


class FuseMount:
    """A cvmfs-ml FUSE mount (:func:`cvmfs_ml.client.fuse.mount`): its own daemon process.

    The daemon runs in a separate process, as in production, so its memory and CPU are not
    the loader's; unmounting drops the mount's page cache and the daemon's state.
    """

    def __init__(self, url: str, mountpoint: Path, *, key: Path, cache: Path,
                 proxy: str | None = None, trace: Path | None = None,
                 options: dict[str, Any] | None = None, log_file: Path | None = None) -> None:
        self.url = url
        self.mountpoint = Path(mountpoint)
        self.key = key
        self.cache = cache
        self.proxy = proxy
        self.trace = trace
        self.options = dict(options or {})
        self.log_file = log_file
        self.handle: Any = None
        self.mount_seconds: float | None = None

    def start(self, timeout: float = 60.0) -> FuseMount:
        from cvmfs_ml.client.fuse import mount

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.handle = mount(self.url, self.mountpoint, public_key=self.key, cache=self.cache,
                            proxy=self.proxy, trace=self.trace, log_file=self.log_file,
                            timeout=timeout, **self.options)
        self.mount_seconds = time.perf_counter() - started
        return self

    def stop(self) -> None:
        """Unmount and wait for the daemon to exit (the trace is flushed by then)."""
        if self.handle is not None:
            self.handle.unmount()
            self.handle = None

    @property
    def running(self) -> bool:
        return self.handle is not None and self.handle.mounted

    def __enter__(self) -> FuseMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FuseMode(StorageMode):
    """The published repository on a cvmfs-ml FUSE mount (``cvmfs-ml mount`` subprocess)."""

    name = "fuse"
    needs_endpoint = True
    path_based = True

    def __init__(self, **mount_options: Any) -> None:
        super().__init__()
        self.mount_options = mount_options  # e.g. readahead_kb=128, prefetch_workers=4
        self.mount: FuseMount | None = None
        self.mount_seconds: list[float] = []
        self.trace: Path | None = None

    def start(self, ctx: ModeContext) -> None:
        super().start(ctx)
        if not os.path.exists("/dev/fuse"):
            raise ConfigError("/dev/fuse is missing: no FUSE on this machine")
        base = ctx.workdir / f"fuse-{ctx.endpoint.network if ctx.endpoint else 'x'}"
        self.mountpoint = base / "mnt"
        self.cache = base / "cache"
        self.base = base

    def _mount(self, trace: Path | None = None) -> FuseMount:
        ep = self._ctx.endpoint
        assert ep is not None
        self._unmount()
        self.mount = FuseMount(ep.repo_url, self.mountpoint, key=ep.public_key, cache=self.cache,
                               proxy=ep.proxy, trace=trace, options=self.mount_options,
                               log_file=self.base / "mount.log").start()
        if self.mount.mount_seconds is not None:
            self.mount_seconds.append(self.mount.mount_seconds)
        return self.mount

    def _unmount(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            self.mount = None

    def remount_with_trace(self, trace: Path) -> None:
        """Cold mount that records every read to ``trace`` (for access patterns)."""
        self._unmount()
        wipe_cvmfs_ml_cache(self.cache)
        self._ctx.drop([self.cache])
        self._mount(trace)

    def stop(self) -> None:
        self._unmount()

    def files_for_residency(self, model: ModelFiles) -> list[Path]:
        return [self.mountpoint / model.name / f for f in model.files]

    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        if state is CacheState.HOT and self.mount is not None and self.mount.running:
            return
        self._unmount()
        if state is CacheState.COLD and self.cache.exists():
            wipe_cvmfs_ml_cache(self.cache)
        self._ctx.drop([self.cache])
        self._mount()

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        return {"kind": "path", "root": str(self.mountpoint / model.name)}

    def settings(self) -> dict[str, Any]:
        mounts = sorted(self.mount_seconds)
        return {**super().settings(), "mount": "cvmfs_ml.client.fuse.mount (daemon process)",
                "mount_options": self.mount_options,
                "mount_seconds_median": mounts[len(mounts) // 2] if mounts else None}


def fsspec_available() -> bool:
    """Whether the cvmfs-ml fsspec filesystem (``cvmfs://``) is installed."""
    try:
        import fsspec

        fsspec.get_filesystem_class("cvmfs")
        return True
    except (ImportError, ValueError):
        return False


class FsspecMode(StorageMode):
    """The cvmfs-ml Python client in the loader's process (fsspec ``cvmfs`` filesystem).

    The files are read completely into memory, as an application using fsspec does, and the
    runtime loads from memory. If the fsspec filesystem is not installed the mode falls back to
    :class:`~cvmfs_ml.client.repository.Repository` and says so in its settings.
    """

    name = "fsspec"
    needs_endpoint = True

    def start(self, ctx: ModeContext) -> None:
        super().start(ctx)
        self.cache = ctx.workdir / f"fsspec-{ctx.endpoint.network if ctx.endpoint else 'x'}-cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.client = "fsspec" if fsspec_available() else "repository"

    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        if state is CacheState.COLD:
            wipe_cvmfs_ml_cache(self.cache)
        if state is not CacheState.HOT:
            self._ctx.drop([self.cache])

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        ep = self._ctx.endpoint
        assert ep is not None
        spec: dict[str, Any] = {
            "kind": "cvmfs", "client": self.client, "root": f"/{model.name}",
            "url": ep.repo_url, "fqrn": ep.fqrn, "public_key": str(ep.public_key),
            "cache": str(self.cache), "proxy": ep.proxy,
        }
        spec["storage_options"] = {k: v for k, v in (
            ("url", ep.repo_url), ("fqrn", ep.fqrn), ("public_key", str(ep.public_key)),
            ("cache", str(self.cache)), ("proxy", ep.proxy)) if v is not None}
        return spec

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "client": getattr(self, "client", None)}


class GetMode(FsspecMode):
    """``cvmfs-ml model get`` with no mount: a verified local copy made through the client.

    The copy (:func:`cvmfs_ml.models.materialise.materialise`, what ``model get --copy``
    runs) is made by the measured process into its scratch folder, so its time counts; the
    client cache lives across measurements like :class:`FsspecMode`'s: cold wipes it, warm
    keeps it (the copy is then hard-linked from the cache, nothing fetched), hot keeps the page
    cache too.
    """

    name = "get"

    def start(self, ctx: ModeContext) -> None:
        super().start(ctx)
        self.client = "model get (cvmfs_ml.models.materialise.materialise)"

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        spec = super().access(model, scratch)
        spec.pop("storage_options", None)
        return {**spec, "kind": "get", "dest": str(scratch / "get")}

    def after(self, model: ModelFiles, scratch: Path) -> None:
        shutil.rmtree(scratch / "get", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# copy-then-load


class DownloadMode(StorageMode):
    """GET every file over HTTP to local disk, then load it: KServe's storage initializer."""

    name = "download"
    states = (CacheState.COLD,)
    needs_endpoint = True
    path_based = False

    def start(self, ctx: ModeContext) -> None:
        super().start(ctx)
        if ctx.endpoint is None or not ctx.endpoint.plain_url:
            raise ConfigError("the download mode needs the plain model files served over HTTP")

    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        """Nothing to drop: the copy is made fresh by every measurement."""

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        ep = self._ctx.endpoint
        assert ep is not None and ep.plain_url
        return {"kind": "download", "base_url": f"{ep.plain_url}/{model.name}",
                "dest": str(scratch / "download")}

    def after(self, model: ModelFiles, scratch: Path) -> None:
        shutil.rmtree(scratch / "download", ignore_errors=True)


def oras_push(registry: str, repository: str, tag: str, folder: Path,
              files: Sequence[str]) -> str:
    """Push ``files`` of ``folder`` as one ORAS artifact; return the reference.

    oras names each layer after the path it was given, so the push runs with ``folder`` as the
    working directory (in a child process, not to change the caller's cwd).
    """
    reference = f"{registry}/{repository}:{tag}"
    code = ("import sys, oras.client\n"
            "c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)\n"
            "c.push(target=sys.argv[2], files=sys.argv[3:], disable_path_validation=True, "
            "quiet=True)\n")
    done = subprocess.run([sys.executable, "-c", code, registry, reference, *files],
                          cwd=folder, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise CvmfsMlError(f"oras push {reference} failed: {done.stderr.strip()[-1000:]}")
    return reference


class OciMode(StorageMode):
    """``oras pull`` from a local docker-registry to local disk, then load."""

    name = "oci"
    states = (CacheState.COLD,)
    needs_endpoint = True

    def start(self, ctx: ModeContext) -> None:
        super().start(ctx)
        if ctx.endpoint is None or not ctx.endpoint.registry:
            raise ConfigError("the oci mode needs a docker-registry")
        self.pushed: dict[str, str] = {}

    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        ep = self._ctx.endpoint
        assert ep is not None and ep.registry
        if model.name not in self.pushed:
            self.pushed[model.name] = oras_push(ep.registry, f"bench/{model.name}", "v1",
                                                model.folder, model.files)

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        ep = self._ctx.endpoint
        assert ep is not None
        return {"kind": "oci", "registry": ep.registry, "reference": self.pushed[model.name],
                "dest": str(scratch / "oci")}

    def after(self, model: ModelFiles, scratch: Path) -> None:
        shutil.rmtree(scratch / "oci", ignore_errors=True)


MODES: dict[str, type[StorageMode]] = {
    cls.name: cls
    for cls in (LocalMode, FuseMode, FsspecMode, GetMode, PathMode, DownloadMode, OciMode)
}


def make_mode(name: str, **options: Any) -> StorageMode:
    """A fresh mode object by name (``path`` takes ``root=``)."""
    if name == "upstream":  # upstream's own client, in its module (it builds on this one)
        from cvmfs_ml.bench.upstream import UpstreamMode

        return UpstreamMode(**options)
    try:
        cls = MODES[name]
    except KeyError:
        raise ConfigError(f"unknown storage mode {name!r}; known: {sorted(MODES)}") from None
    return cls(**options)


@contextlib.contextmanager
def started(mode: StorageMode, ctx: ModeContext) -> Any:
    """``with started(mode, ctx):`` - start and always stop a mode."""
    mode.start(ctx)
    try:
        yield mode
    finally:
        mode.stop()
