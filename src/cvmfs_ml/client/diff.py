"""Differences between two revisions of a repository, by path."""

from __future__ import annotations

from typing import Any

__all__ = ["diff_trees"]


def _signature(repo: Any, entry: Any) -> tuple:
    content: tuple = ()
    if entry.is_regular:
        content = tuple(p.digest.hex for p in repo.layout(entry).pieces)
    return (entry.mode, entry.size, entry.symlink, content, tuple(sorted(entry.xattrs.items())))


def diff_trees(old: Any, new: Any, path: str = "") -> list[tuple[str, str]]:
    """``[(change, path)]`` with change ``+`` (added), ``-`` (removed) or ``M`` (modified).

    ``old`` and ``new`` are :class:`~cvmfs_ml.client.repository.Repository` views of the same
    repository at two revisions. Sorted by path.
    """
    before = {e.path: e for e in old.walk(path)}
    after = {e.path: e for e in new.walk(path)}
    changes = [("-", p) for p in before.keys() - after.keys()]
    changes += [("+", p) for p in after.keys() - before.keys()]
    for p in before.keys() & after.keys():
        if _signature(old, before[p]) != _signature(new, after[p]):
            changes.append(("M", p))
    return sorted(changes, key=lambda c: (c[1], c[0]))
