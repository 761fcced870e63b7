"""Live updates of a mount: take new revisions on the TTL and tell the kernel what changed.

Upstream's client checks ``.cvmfspublished`` when the root catalog's TTL expires (capped by
``CVMFS_MAX_TTL``), loads the new root catalog and switches to it in one step ("remount"), then
has the kernel drop what it cached of the old tree (``fuse_invalidator.cc``). This module does
the same over one :class:`~cvmfs_ml.client.repository.Repository`:

* :class:`LiveUpdates` runs on the mount's trio loop: it sleeps until the TTL expires, lets
  :meth:`Repository.maybe_refresh` verify and load the new revision (in a worker thread; a
  failed check keeps the current revision and is retried after another TTL, so an offline site
  keeps working), then follows the switch in the kernel. ``cvmfs-ml reload`` asks for a check
  now through :meth:`LiveUpdates.check`.
* :func:`tree_changes` compares every path the kernel knows (the mount's inode table) with the
  new tree. A file, symlink or device whose entry changed gets a new inode number, and the
  kernel forgets its name (``invalidate_entry``): the next lookup finds the new inode, while a
  file opened before keeps its old inode, its old page cache and its old pieces, so it reads
  the revision it opened to the end. Folders keep their inode (a shell inside stays there);
  their attributes are invalidated (``invalidate_inode``). Names the kernel had cached as
  missing and that exist now are invalidated too.

Pinned mounts (``--tag``, a root hash) never move: no periodic check runs for them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.catalog import DirectoryEntry
from cvmfs_ml.errors import CvmfsMlError, NotFoundError

__all__ = ["KernelView", "LiveUpdates", "TreeChanges", "entry_name", "tree_changes"]

log = logging.getLogger("cvmfs_ml.fuse")

RETRY_AFTER_FAILURE = 60.0
"""At most this many seconds between checks after a failed one (upstream retries early too)."""
MIN_SLEEP = 1.0
"""Fewest seconds between periodic checks, whatever TTL a repository asks for."""


@dataclass
class TreeChanges:
    """What a switch to a new revision means for the kernel's view of the mount."""

    renamed: list[tuple[str, int]] = field(default_factory=list)
    """``(path, old inode)``: the path now names another entry (or none): forget the old inode
    for this path and drop the name from the kernel's cache."""
    folders: list[tuple[int, DirectoryEntry]] = field(default_factory=list)
    """``(inode, new entry)``: folders still there whose attributes changed."""
    appeared: list[tuple[int, str]] = field(default_factory=list)
    """``(parent inode, path)``: names cached as missing that exist now."""

    def __bool__(self) -> bool:
        return bool(self.renamed or self.folders or self.appeared)


def _new_entry(repo: Repository, path: str) -> DirectoryEntry | None:
    try:
        return repo.stat(path)
    except (NotFoundError, FileNotFoundError, NotADirectoryError):
        return None


def tree_changes(
    repo: Repository,
    known: Iterable[tuple[str, int, DirectoryEntry | None]],
    missing: Iterable[tuple[int, str]],
) -> TreeChanges:
    """Compare what the kernel knows with ``repo``'s current tree (blocking: a worker thread).

    ``known`` is ``(path, inode, entry served)`` for every inode handed out; ``missing`` is
    ``(parent inode, path)`` for names answered "does not exist". A path whose new entry cannot
    be read (a nested catalog that fails to download) is left as it is: serving the old entry
    beats an error, and the next switch looks again.
    """
    changes = TreeChanges()
    for path, inode, old in known:
        if old is None:
            continue
        try:
            new = _new_entry(repo, path)
        except (CvmfsMlError, OSError) as exc:
            log.warning("live update: cannot look up %s in the new revision: %s", path or "/", exc)
            continue
        if new == old:
            continue
        if new is not None and new.is_dir and old.is_dir:
            changes.folders.append((inode, new))
        else:
            changes.renamed.append((path, inode))
    for parent_inode, path in missing:
        with contextlib.suppress(CvmfsMlError, OSError):
            if _new_entry(repo, path) is not None:
                changes.appeared.append((parent_inode, path))
    return changes


class KernelView(Protocol):
    """What :class:`LiveUpdates` needs from the FUSE operations (``CvmfsOperations``)."""

    repo: Repository

    def known_entries(self) -> list[tuple[str, int, DirectoryEntry | None]]: ...

    def missing_names(self) -> list[tuple[int, str]]: ...

    def adopt_changes(self, changes: TreeChanges) -> list[tuple[int, bytes] | int]: ...


class LiveUpdates:
    """Follow new revisions for one mount (see the module docstring).

    ``invalidate_entry(parent_inode, name)`` and ``invalidate_inode(inode)`` reach the kernel
    (pyfuse3's functions); they run in a worker thread, because the kernel may wait for a
    request on the same folder that the loop has yet to answer.
    """

    def __init__(
        self,
        view: KernelView,
        invalidate_entry: Callable[[int, bytes], None],
        invalidate_inode: Callable[[int], None],
    ) -> None:
        import trio

        self._trio = trio
        self.view = view
        self.repo = view.repo
        self._invalidate_entry = invalidate_entry
        self._invalidate_inode = invalidate_inode
        self._lock = trio.Lock()
        self.switches = 0
        self.invalidations = 0
        self.last_check: float | None = None  # wall clock of the last check
        self.last_error: str | None = None
        self.last_switch_seconds: float | None = None  # refresh start -> kernel told
        # What the mount shows as its revision (user.revision, stats): taken over only once
        # the kernel has been told what changed, so a reader that sees the new number never
        # reads a name the kernel still maps to the old revision's inode.
        self.followed_revision = self.repo.revision
        self.followed_root_hash = self.repo.root_hash

    @property
    def pinned(self) -> bool:
        return bool(self.repo.pinned)

    async def run(self) -> None:
        """Check on the TTL until cancelled (returns at once for a pinned mount)."""
        if self.pinned:
            return
        while True:
            delay = self.repo.seconds_to_check
            if self.last_error is not None:
                delay = min(delay, RETRY_AFTER_FAILURE)
            await self._trio.sleep(max(MIN_SLEEP, delay))
            if self.repo.refresh_due or self.last_error is not None:
                await self.check(forced=False)

    async def check(self, *, forced: bool) -> dict[str, Any]:
        """Look for a new revision now (``forced``) or if due; follow a switch in the kernel.

        Returns ``{"ok", "changed", "revision", "previous", "pinned", "error", "seconds"}``.
        A failure keeps the current revision (``ok`` false, ``error`` says why).
        """
        async with self._lock:
            started = time.monotonic()
            previous = self.repo.revision
            result: dict[str, Any] = {"ok": True, "changed": False, "previous": previous,
                                      "pinned": self.pinned, "error": None}  # fmt: skip
            try:
                if forced:
                    changed = await self._trio.to_thread.run_sync(self.repo.refresh)
                else:
                    changed = await self._trio.to_thread.run_sync(self._due_refresh)
            except Exception as exc:  # whatever fails, the mount keeps serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: staying on revision %d: %s", self.repo.fqrn, previous, exc)
                result.update(ok=False, error=self.last_error)
                changed = False
            else:
                self.last_error = None
            self.last_check = time.time()
            if changed:
                try:
                    await self._follow()
                except Exception as exc:  # the switch stands; the kernel may serve stale names
                    log.error("%s: following revision %d in the kernel: %s: %s", self.repo.fqrn,
                              self.repo.revision, type(exc).__name__, exc)  # fmt: skip
                self.switches += 1
                self.last_switch_seconds = time.monotonic() - started
                log.info("%s: now at revision %d (was %d)", self.repo.fqrn,
                         self.repo.revision, previous)  # fmt: skip
            self.followed_revision = self.repo.revision
            self.followed_root_hash = self.repo.root_hash
            result.update(changed=changed, revision=self.repo.revision,
                          seconds=round(time.monotonic() - started, 3))  # fmt: skip
            return result

    def _due_refresh(self) -> bool:
        """:meth:`Repository.refresh` on the TTL; unlike ``maybe_refresh`` it raises, so the
        failure is reported and retried early."""
        if not self.repo.refresh_due and self.last_error is None:
            return False
        return self.repo.refresh(nocache=False)  # a failed check restarts the TTL clock too

    async def _follow(self) -> None:
        """Update the inode table for the new tree, then tell the kernel (in a thread).

        The kernel may hold an invalidation until a request on the same folder is answered;
        the loop keeps answering meanwhile (this task only waits), and no request handler
        waits for it except ``reload``'s getxattr, which is not such a request.
        """
        known = self.view.known_entries()
        missing = self.view.missing_names()
        changes = await self._trio.to_thread.run_sync(tree_changes, self.repo, known, missing)
        targets = self.view.adopt_changes(changes)
        if targets:
            await self._trio.to_thread.run_sync(self._invalidate_blocking, targets)

    def _invalidate_blocking(self, targets: list[tuple[int, bytes] | int]) -> None:
        for target in targets:
            try:
                if isinstance(target, tuple):
                    self._invalidate_entry(*target)
                else:
                    self._invalidate_inode(target)
                self.invalidations += 1
            except OSError as exc:  # ENOENT: the kernel had already forgotten it
                if exc.errno != errno.ENOENT:
                    log.info("invalidate %r: %s", target, exc)
            except Exception as exc:  # e.g. the session is closing
                log.info("invalidate %r: %s: %s", target, type(exc).__name__, exc)

    def stats(self) -> dict[str, Any]:
        return {
            "pinned": self.pinned,
            "ttl_seconds": self.repo.ttl,
            "next_check_seconds": None if self.pinned else round(self.repo.seconds_to_check, 3),
            "switches": self.switches,
            "invalidations": self.invalidations,
            "last_check": self.last_check,
            "last_error": self.last_error,
            "last_switch_seconds": self.last_switch_seconds,
        }


def entry_name(path: str) -> bytes:
    """The last component of a repository path, as the kernel knows it (bytes)."""
    return posixpath.basename(path).encode("utf-8", "surrogateescape")
