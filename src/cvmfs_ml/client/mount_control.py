"""Talking to a running mount daemon: ``cvmfs-ml reload`` and ``cvmfs-ml stats``.

Upstream's ``cvmfs_talk`` speaks to the daemon over a socket in the cache folder (``remount``,
``internal affairs``). cvmfs-ml uses extended attributes of the mount's root instead: reading
``user.cvmfs_ml.reload`` makes the daemon check for a new revision now and answers with the
result; ``user.cvmfs_ml.stats`` answers with its counters. Why: the request goes through the
kernel to exactly the daemon serving that folder, so there is no socket path or pid to find
(``stats MOUNTPOINT`` works for every mount, also one started by another user or inside a
container), the answer comes back synchronously with the result (a signal could not say whether
the check failed), and the kernel tells the daemon who asks, so a reload is refused to anyone but
root and the mount's owner, the same people who can use upstream's socket. Everyone who can read
the mount may read the statistics, as upstream's ``user.*`` attributes allow.

This module also provides the mount-wide ``user.*`` attributes upstream offers
(``cvmfs/magic_xattr.cc``) beyond the per-file ones in :mod:`cvmfs_ml.client.fuse`.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cvmfs_ml.errors import ConfigError, CvmfsMlError

__all__ = [
    "CONTROL_XATTRS",
    "RELOAD_XATTR",
    "STATS_XATTR",
    "MountCounters",
    "mount_stats",
    "read_mount_stats",
    "reload_mount",
    "upstream_magic",
]

RELOAD_XATTR = b"user.cvmfs_ml.reload"
STATS_XATTR = b"user.cvmfs_ml.stats"
CONTROL_XATTRS = frozenset({RELOAD_XATTR, STATS_XATTR})
_MAX_REPLY = 64 * 1024  # what a getxattr answer may hold


@dataclass
class MountCounters:
    """What the FUSE layer counts (the repository and the fetcher count the rest)."""

    started: float = field(default_factory=time.time)
    opens: int = 0
    dir_opens: int = 0
    dir_listings: int = 0  # opendir calls that listed (the others shared an open listing)
    io_errors: int = 0
    last_io_error: float = 0.0

    def io_error(self) -> None:
        self.io_errors += 1
        self.last_io_error = time.time()


def _shown(repo: Any, live: Any) -> tuple[int, Any]:
    """The revision and root hash the mount shows: the live updater's once it has told the
    kernel about a switch (:attr:`LiveUpdates.followed_revision`), else the repository's."""
    if live is not None:
        return live.followed_revision, live.followed_root_hash
    return repo.revision, repo.root_hash


def _host(repo: Any) -> str:
    return str(getattr(repo.source, "current_host", None) or getattr(repo.source, "root", ""))


def _fetch_stats(repo: Any) -> dict[str, Any]:
    stats = getattr(repo.source, "stats", None)
    if stats is None or callable(stats):  # a local folder: nothing goes over the network
        return {"objects": repo.counters["cache_misses"], "bytes": None, "requests": 0,
                "failovers": 0, "retries": 0, "bad_data": 0}  # fmt: skip
    return {
        "objects": stats.fetches,
        "bytes": stats.bytes_received,
        "requests": stats.requests,
        "failovers": stats.failovers,
        "retries": stats.retries,
        "bad_data": stats.bad_data,
        # where the fetch threads' CPU went (issue 8 item 9's profile, per phase)
        "cpu_seconds": {
            "receive": round(stats.receive_cpu_s, 3),
            "hash": round(stats.hash_cpu_s, 3),
            "store": round(stats.store_cpu_s, 3),
        },
    }


def mount_stats(
    repo: Any, live: Any, counters: MountCounters, open_files: int, inodes: int
) -> dict[str, Any]:
    """The daemon's counters, like upstream's ``cvmfs_talk internal affairs``."""
    hits, misses = repo.counters["cache_hits"], repo.counters["cache_misses"]
    usage = None
    try:
        usage = repo.cache.usage()
    except (CvmfsMlError, OSError):
        pass
    return {
        "fqrn": repo.fqrn,
        "revision": _shown(repo, live)[0],
        "root_hash": _shown(repo, live)[1].hex,
        "host": _host(repo),
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - counters.started, 3),
        "fetch": _fetch_stats(repo),
        "cache": {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "used_bytes": getattr(usage, "size_bytes", None),
            "quota_bytes": repo.cache.quota_bytes,
        },
        "refresh": {
            "checks": repo.counters["refresh_checks"],
            "switches": repo.counters["refresh_switches"],
            "failures": repo.counters["refresh_failures"],
            **(live.stats() if live is not None else {}),
        },
        "fuse": {**asdict(counters), "open_files": open_files, "inodes": inodes},
    }


def upstream_magic(
    repo: Any, live: Any, counters: MountCounters, tag: str | None
) -> dict[bytes, Callable[[], bytes]]:
    """Mount-wide ``user.*`` attributes with upstream's names and value formats."""

    def text(value: object) -> bytes:
        return str(value).encode()

    def host_list() -> bytes:
        hosts = list(getattr(repo.source, "hosts", None) or [_host(repo)])
        current = _host(repo)
        if current in hosts:  # upstream lists from the current host on
            at = hosts.index(current)
            hosts = hosts[at:] + hosts[:at]
        return ";".join(hosts).encode()

    def proxy() -> bytes:
        groups = getattr(repo.source, "proxy_groups", None) or [["DIRECT"]]
        return text(groups[0][0] if groups and groups[0] else "DIRECT")

    def hitrate() -> bytes:
        hits, misses = repo.counters["cache_hits"], repo.counters["cache_misses"]
        return b"n/a" if hits + misses == 0 else text(f"{100.0 * hits / (hits + misses):.3f}")

    def expires() -> bytes:  # minutes until the next check (upstream 2.x: user.expires)
        if live is None or live.pinned:
            return b"never"
        return text(int(repo.seconds_to_check // 60))

    fetch = _fetch_stats
    magic = {
        b"user.fqrn": lambda: text(repo.fqrn),
        b"user.revision": lambda: text(_shown(repo, live)[0]),
        b"user.root_hash": lambda: text(_shown(repo, live)[1].hex),
        b"user.host": lambda: text(_host(repo)),
        b"user.host_list": host_list,
        b"user.proxy": proxy,
        b"user.expires": expires,
        b"user.hitrate": hitrate,
        b"user.ndownload": lambda: text(fetch(repo)["objects"]),
        b"user.rx": lambda: text((fetch(repo)["bytes"] or 0) // 1024),
        b"user.nclg": lambda: text(repo.loaded_catalogs),
        b"user.nopen": lambda: text(counters.opens),
        b"user.ndiropen": lambda: text(counters.dir_opens),
        b"user.nioerr": lambda: text(counters.io_errors),
        b"user.timestamp_last_ioerr": lambda: text(int(counters.last_io_error)),
        b"user.timeout": lambda: text(int(getattr(repo.source, "timeout", 0) or 0)),
        b"user.timeout_direct": lambda: text(int(getattr(repo.source, "timeout_direct", 0) or 0)),
        b"user.pid": lambda: text(os.getpid()),
    }
    if tag:  # an empty value reads as "no such attribute" through FUSE
        magic[b"user.tag"] = lambda: text(tag)
    return magic


def may_reload(uid: int) -> bool:
    """Root and the mount's owner may force a check (upstream: who can use the socket)."""
    return uid in (0, os.getuid())


def control_reply(result: dict[str, Any]) -> bytes:
    """A control answer as JSON, cut to what a getxattr reply can hold."""
    return json.dumps(result, sort_keys=True).encode()[:_MAX_REPLY]


# ------------------------------------------------------------------------------ client side
def _ask(mountpoint: str | os.PathLike[str], name: bytes) -> dict[str, Any]:
    target = os.fspath(mountpoint)
    if not os.path.isdir(target):
        raise ConfigError(f"{target} is not a folder")
    try:
        raw = os.getxattr(target, name.decode())
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise ConfigError(
                f"{target} is not the root of a cvmfs-ml mount (no {name.decode()})"
            ) from exc
        if exc.errno == errno.EPERM:
            raise ConfigError(
                f"only root or the user who mounted {target} may do that"
            ) from exc
        raise ConfigError(f"{target}: {exc.strerror or exc}") from exc
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{target}: the daemon's answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise ConfigError(f"{target}: the daemon's answer is not a JSON object")
    return answer


def reload_mount(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """Make the daemon at ``mountpoint`` check for a new revision now; its answer.

    ``{"ok", "changed", "previous", "revision", "pinned", "error", "seconds"}``: a failed
    check (``ok`` false) leaves the mount on its revision.
    """
    return _ask(mountpoint, RELOAD_XATTR)


def read_mount_stats(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The counters of the daemon at ``mountpoint`` (see :func:`mount_stats`)."""
    return _ask(mountpoint, STATS_XATTR)
