"""Making "cold" runs cold: drop page-cache pages and wipe client caches between benchmark runs.

A cold benchmark is only cold if every cache between the loader and the network is empty: the
kernel page cache of the files being read (on the FUSE mount *and* of the cache files behind
it), the cvmfs-ml client cache, and, when the upstream client is installed, its cache too.

``posix_fadvise(POSIX_FADV_DONTNEED)`` is per file, needs no privileges and works on FUSE
mounts (performance-notes.md used it to drop a FUSE file's cache). It is best effort: dirty
pages are written back first (we ``fdatasync`` before advising) and pages mapped by a running
process stay. The global ``/proc/sys/vm/drop_caches`` is root-only and hits the whole machine,
so it is opt-in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.storage.pagecache import drop_cached_pages

__all__ = ["DropResult", "drop_page_cache", "wipe_cvmfs_ml_cache", "wipe_upstream_cache"]


@dataclass(frozen=True)
class DropResult:
    """What :func:`drop_page_cache` did: files advised, files that refused, global drop done."""

    files: int
    failed: int
    global_dropped: bool


def _walk(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for p in paths:
        path = Path(p)
        if path.is_dir() and not path.is_symlink():
            for root, _dirs, files in os.walk(path):
                for name in files:
                    yield Path(root, name)
        elif path.is_file():
            yield path


def drop_page_cache(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                    *, global_drop: bool = False) -> DropResult:
    """Evict the page cache of ``paths`` (files, or folders recursively).

    With ``global_drop`` and root, also ``sync`` and ``echo 1 > /proc/sys/vm/drop_caches``,
    which empties the page cache of the whole machine (the only way to evict pages another
    process keeps mapped).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = failed = 0
    for path in _walk(paths):
        if drop_cached_pages(path):  # written back first: DONTNEED skips dirty pages
            files += 1
        else:
            failed += 1
    dropped = False
    if global_drop and os.geteuid() == 0:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            dropped = True
        except OSError:
            dropped = False
    return DropResult(files, failed, dropped)


def wipe_cvmfs_ml_cache(cache_dir: str | os.PathLike[str]) -> int:
    """Delete everything inside the cvmfs-ml client cache ``cache_dir``; return bytes freed.

    The folder itself stays (a running client may hold it open). Refuses ``/``, the home
    folder and anything that is not a directory, because a wrong argument here would delete
    far more than a cache.
    """
    root = Path(cache_dir).resolve()
    if root in (Path("/"), Path.home().resolve()) or len(root.parts) < 3:
        raise CvmfsMlError(f"refusing to wipe {root}: not a plausible cache directory")
    if not root.exists():
        return 0
    if not root.is_dir():
        raise NotADirectoryError(root)
    freed = 0
    for entry in list(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            freed += sum(f.stat().st_size for f in entry.rglob("*")
                         if f.is_file() and not f.is_symlink())
            shutil.rmtree(entry)
        else:
            freed += entry.lstat().st_size
            entry.unlink()
    return freed


def wipe_upstream_cache() -> bool:
    """Run ``cvmfs_config wipecache`` if the upstream client is installed.

    Returns False when ``cvmfs_config`` is absent, True when the wipe succeeded; a failing
    wipe raises, since a benchmark that thinks it is cold but is not gives wrong numbers.
    """
    tool = shutil.which("cvmfs_config")
    if tool is None:
        return False
    result = subprocess.run([tool, "wipecache"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CvmfsMlError(f"cvmfs_config wipecache failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return True
