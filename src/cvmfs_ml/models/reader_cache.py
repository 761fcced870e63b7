"""The model publisher's cache for reading back what is published (the index, ``model.json``,
aliases), kept where the user's other caches are, and bounded.

Objects are content-addressed and verified on fetch, so one cache per process and repository
stays valid across revisions and saves making (and removing) a 256-folder cache per
transaction. Each holds at most :data:`QUOTA` bytes. They live in one folder per process,
``<user cache folder>/publisher/reads.<random>/`` (``$XDG_CACHE_HOME`` or ``~/.cache``, then
``cvmfs-ml``, as the client's own cache), 0700, held with a lock for the life of the process and
removed at its exit (:func:`cvmfs_ml.storage.held.held_folder`): a process that cannot unwind
(``kill -9``, the OOM killer, or a SIGTERM, which runs no exit handler) leaves its folder to the
next publisher, which removes it. The cache was a ``mkdtemp`` folder of the system temporary
folder, which each killed publisher left there for good, in space other users share.

The folder is used only where it is this user's and nobody else may write into it (a shared
``XDG_CACHE_HOME`` could hold another user's ``cvmfs-ml``, or a link to their folder); otherwise
the system temporary folder takes its place, the same way, provided it keeps each user's names
theirs (sticky, as ``/tmp`` is) or is private.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import default_cache_base
from cvmfs_ml.errors import PublishError
from cvmfs_ml.storage.held import held_folder

__all__ = ["QUOTA", "reader_cache"]

QUOTA = 256 * 2**20
"""Bytes one cache (one repository read by one process) holds at most."""

_PREFIX = "reads."  # in <user cache folder>/publisher, which holds nothing else
_TMP_PREFIX = "cvmfs-ml-publisher."  # in the shared temporary folder

_caches: dict[object, ObjectCache] = {}
_lock = threading.Lock()
_held: Path | None = None
_stack = contextlib.ExitStack()


def _private(folder: Path) -> bool:
    """``folder`` is a real folder (not a link) of this user that nobody else may write into."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _keeps_names(folder: Path) -> bool:
    """Nobody else can rename or remove what this user makes in ``folder``: it is private (this
    user's or root's, open to no one else's writes) or sticky (``/tmp``)."""
    try:
        info = os.stat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    return bool(info.st_mode & stat.S_ISVTX) or (
        info.st_uid in (0, os.geteuid()) and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _user_folder() -> Path | None:
    """``<user cache folder>/publisher``, made 0700 where missing; None where it (or the
    ``cvmfs-ml`` folder it is in) cannot be made, or is a link, another user's, or open to
    others' writes, or where the folder holding those lets others rename them."""
    top = default_cache_base(os.environ)
    folder = top / "publisher"
    with contextlib.suppress(OSError):
        top.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    checks = ((top.parent, _keeps_names), (top, _private), (folder, _private))
    for path, check in checks:  # each made only inside a folder found to be this user's
        with contextlib.suppress(OSError):
            path.mkdir(mode=0o700)
        if not check(path):
            return None
    return folder


def _process_folder() -> Path:
    """This process's folder (made at the first call, removed at exit)."""
    global _held
    if _held is not None:
        return _held
    user = _user_folder()
    if user is not None:
        parent, prefix = user, _PREFIX
    else:
        parent, prefix = Path(tempfile.gettempdir()), _TMP_PREFIX
        if not _keeps_names(parent):
            user_base = default_cache_base(os.environ)
            raise PublishError(
                f"no private folder for the publisher's read cache: {user_base}"
                f" is not this user's alone, and {parent} lets others rename what is made in it;"
                " set XDG_CACHE_HOME to a folder of yours"
            )
    _held = _stack.enter_context(held_folder(parent, prefix))
    atexit.register(_stack.close)
    return _held


def reader_cache(key: object) -> ObjectCache:
    """The cache of this process for the repository ``key`` names (see the module docstring)."""
    with _lock:
        cache = _caches.get(key)
        if cache is None:
            folder = _process_folder() / str(len(_caches))
            cache = _caches[key] = ObjectCache(folder, QUOTA)
        return cache
