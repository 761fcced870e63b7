"""Upstream CernVM-FS side by side: the ``upstream`` storage mode.

Where upstream's client (``cvmfs2``) is installed, the suite mounts the *same* published
repository with it, with a private configuration in upstream's words and a private cache (no
autofs, no ``/etc/cvmfs`` changes), the way ``cvmfsexec`` and CI jobs mount without root
services: ``cvmfs2 -o config=FILE FQRN MOUNTPOINT``. Every table then shows cvmfs-ml and
upstream from one run. Where ``cvmfs2`` is missing the mode is reported as not measured, with
the reason, instead of failing the run (:func:`upstream_unavailable`).

Cache states follow upstream's meaning: cold wipes the private cache (unmounted), warm keeps
it and remounts (the kernel's page cache of the mount goes with the mount), hot keeps both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.modes import CacheState, ModeContext, ModelFiles, StorageMode
from cvmfs_ml.errors import ConfigError

__all__ = ["UpstreamMode", "upstream_config", "upstream_unavailable"]


def upstream_unavailable() -> str | None:
    """Why upstream's client cannot be measured here, or None when it can."""
    if shutil.which("cvmfs2") is None:
        return "upstream cvmfs2 is not installed here (no upstream column in this run)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: no FUSE on this machine"
    return None


def upstream_config(*, repo_url: str, fqrn: str, public_key: Path, cache: Path,
                    proxy: str | None) -> str:
    """A client configuration in upstream's words for a private mount of ``repo_url``."""
    server = repo_url.replace(f"/cvmfs/{fqrn}", "/cvmfs/@fqrn@")
    return "\n".join([
        f'CVMFS_SERVER_URL="{server}"',
        f'CVMFS_HTTP_PROXY="{proxy or "DIRECT"}"',
        f"CVMFS_PUBLIC_KEY={public_key}",
        f"CVMFS_CACHE_BASE={cache}",
        f"CVMFS_RELOAD_SOCKETS={cache}",
        "CVMFS_SHARED_CACHE=no",
        "CVMFS_QUOTA_LIMIT=-1",  # the benchmark wipes the cache itself
        "CVMFS_CHECK_PERMISSIONS=no",
        "CVMFS_AUTO_UPDATE=no",
        "",
    ])


def _mounted(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == str(path) for line in f)
    except OSError:
        return os.path.ismount(path)


class UpstreamMode(StorageMode):
    """The published repository on upstream's ``cvmfs2`` (private config and cache)."""

    name = "upstream"
    needs_endpoint = True
    path_based = True

    def __init__(self, *, mount_timeout: float = 60.0) -> None:
        super().__init__()
        self.mount_timeout = mount_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ctx: ModeContext) -> None:
        reason = upstream_unavailable()
        if reason is not None:
            raise ConfigError(reason)
        super().start(ctx)
        assert ctx.endpoint is not None
        base = ctx.workdir / f"upstream-{ctx.endpoint.network}"
        self.mountpoint, self.cache = base / "mnt", base / "cache"
        self.config = base / "client.conf"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config.write_text(upstream_config(
            repo_url=ctx.endpoint.repo_url, fqrn=ctx.endpoint.fqrn,
            public_key=ctx.endpoint.public_key, cache=self.cache, proxy=ctx.endpoint.proxy))

    def _mount(self) -> None:
        ep = self._ctx.endpoint
        assert ep is not None
        self.process = subprocess.Popen(
            ["cvmfs2", "-o", f"config={self.config}", ep.fqrn, str(self.mountpoint)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.mount_timeout
        while not _mounted(self.mountpoint):
            if time.monotonic() > deadline or (self.process.poll() not in (None, 0)):
                err = b""
                if self.process.poll() is not None and self.process.stderr is not None:
                    err = self.process.stderr.read() or b""
                self._unmount()
                raise ConfigError(f"cvmfs2 did not mount {ep.fqrn}: "
                                  f"{err.decode(errors='replace').strip()[-300:] or 'timeout'}")
            time.sleep(0.05)

    def _unmount(self) -> None:
        if _mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False,
                           capture_output=True, timeout=30)
        if self.process is not None:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            self.process = None

    def stop(self) -> None:
        self._unmount()

    def files_for_residency(self, model: ModelFiles) -> list[Path]:
        return [self.mountpoint / model.name / f for f in model.files]

    def prepare(self, model: ModelFiles, state: CacheState) -> None:
        if state is CacheState.HOT and _mounted(self.mountpoint):
            return
        self._unmount()
        if state is CacheState.COLD:
            shutil.rmtree(self.cache, ignore_errors=True)
            self.cache.mkdir(parents=True, exist_ok=True)
        self._ctx.drop([self.cache])
        self._mount()

    def access(self, model: ModelFiles, scratch: Path) -> dict[str, Any]:
        return {"kind": "path", "root": str(self.mountpoint / model.name)}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mount": "cvmfs2 -o config=FILE (private cache)"}
