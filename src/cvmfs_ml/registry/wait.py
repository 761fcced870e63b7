"""``cvmfs-ml wait``: poll repositories through the client until a content ID is visible.

What a job wrapper does after ``publish`` (jobsub's ``exists`` loop, the worker-node ``test -d``
loop), without a server round trip: it reads the repositories themselves, verified, so "visible"
means a client of those repositories sees the CID's folder, not that some server says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence

from cvmfs_ml.client.locate import open_target
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import ConfigError, CvmfsMlError, DownloadError, UnsafeInputError
from cvmfs_ml.registry.cid import ContentId

__all__ = ["CidTimeoutError", "wait_for_cid"]


class CidTimeoutError(CvmfsMlError):
    """The content ID did not become visible in time."""


# Errors that waiting cannot fix. A server that is down, a repository not created yet (404) and
# a signature that does not verify yet (a publisher mid-way) are retried.
_NOT_RETRIED = (CidTimeoutError, ConfigError, UnsafeInputError)
MAX_INTERVAL = 86400.0  # seconds between polls: a day


def wait_for_cid(
    cid: str,
    targets: Sequence[str],
    *,
    timeout: float = 1200.0,
    interval: float = 5.0,
    prefix: str = "sw",
    public_key: str | None = None,
    config_files: Sequence[str | os.PathLike[str]] = (),
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """The ``/cvmfs/<fqrn>/<prefix>/<cid>`` path once the CID is visible in any target.

    ``targets`` are URLs, repository folders or FQRNs (as ``cvmfs-ml mount`` takes them). A
    target that cannot be reached yet is retried until the deadline; the last reason is in the
    timeout's message. A target that no retry can fix (a name with no configured server, a
    missing key, an unsafe value) fails at once, so a typo costs no 20 minutes of waiting.
    """
    # NaN fails both; an interval past a day (inf, 1e308) overflowed time.sleep, a traceback.
    # --timeout inf waits for ever.
    if not (0 < interval <= MAX_INTERVAL and timeout >= 0):
        raise ConfigError(f"--interval must be above 0 and at most {MAX_INTERVAL:g} and --timeout"
                          f" at least 0 (seconds), not {interval:g} and {timeout:g}")  # fmt: skip
    path = ContentId.parse(cid).repo_path(prefix)
    deadline = clock() + timeout
    opened: dict[str, Repository] = {}
    last_error: dict[str, str] = {}
    try:
        while True:
            for target in targets:
                try:
                    repo = opened.get(target)
                    if repo is None:
                        repo = opened[target] = open_target(
                            target, public_key=public_key, config_files=config_files,
                            use_config_cache=False,
                        )  # fmt: skip
                    else:
                        repo.refresh()
                    if repo.exists(path):
                        return f"/cvmfs/{repo.fqrn}{path}"
                    last_error.pop(target, None)
                except (DownloadError, OSError, CvmfsMlError) as exc:
                    if isinstance(exc, _NOT_RETRIED):
                        raise
                    last_error[target] = str(exc).splitlines()[0] if str(exc) else repr(exc)
            remaining = deadline - clock()
            if remaining <= 0:
                detail = "; ".join(f"{t}: {e}" for t, e in last_error.items())
                raise CidTimeoutError(
                    f"{cid} not visible in {', '.join(targets)} after {timeout:g} s"
                    + (f" ({detail})" if detail else "")
                )
            time.sleep(min(interval, remaining))
    finally:
        for repo in opened.values():
            with contextlib.suppress(Exception):
                repo.close()
