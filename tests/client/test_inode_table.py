"""The mount's inode table: the kernel's lookup counts decide when an inode and its entry go."""

from __future__ import annotations

import stat

from cvmfs_ml.client.inode_table import InodeTable
from cvmfs_ml.cvmfs.catalog import DirectoryEntry

ROOT = 1


def _entry(path: str) -> DirectoryEntry:
    return DirectoryEntry(path=path, mode=stat.S_IFREG | 0o644, size=1, mtime=0)


def test_an_inode_goes_when_the_kernel_forgets_every_reference() -> None:
    table = InodeTable(ROOT)
    inode = table.inode_for("/a")
    table.set_entry(inode, _entry("/a"))
    table.handed_out(inode)
    table.handed_out(inode)
    table.forget(inode, 1)
    assert table.path(inode) == "/a" and table.entry(inode) is not None
    table.forget(inode, 1)
    assert table.path(inode) is None and table.entry(inode) is None
    assert table.current("/a") is None and len(table) == 1
    again = table.inode_for("/a")
    assert again != inode  # numbers are never reused: the kernel may still name the old one


def test_the_root_is_never_forgotten_and_unknown_inodes_are_ignored() -> None:
    table = InodeTable(ROOT)
    table.handed_out(ROOT)
    table.forget(ROOT, 5)
    table.forget(999, 1)
    assert table.path(ROOT) == "" and table.current("") == ROOT and len(table) == 1


def test_an_entry_the_kernel_refused_is_dropped_but_a_known_one_stays() -> None:
    table = InodeTable(ROOT)
    refused = table.inode_for("/new")
    table.drop_if_unknown(refused)
    assert table.path(refused) is None and table.current("/new") is None
    known = table.inode_for("/old")
    table.handed_out(known)
    table.drop_if_unknown(known)
    assert table.current("/old") == known


def test_hard_link_members_share_an_inode_and_go_together() -> None:
    table = InodeTable(ROOT)
    group = ("/d", 3)
    first, second = table.inode_for("/d/x", group), table.inode_for("/d/y", group)
    assert first == second
    table.handed_out(first)
    table.handed_out(first)
    table.forget(first, 2)
    assert table.current("/d/x") is None and table.current("/d/y") is None
    assert table.inode_for("/d/y", group) != first


def test_a_detached_path_keeps_its_inode_for_open_files_until_forgotten() -> None:
    table = InodeTable(ROOT)
    group = ("/d", 1)
    old = table.inode_for("/d/x", group)
    table.set_entry(old, _entry("/d/x"))
    table.handed_out(old)
    table.detach("/d/x", old)
    assert table.current("/d/x") is None
    assert table.path(old) == "/d/x" and table.entry(old) is not None  # open files read on
    new = table.inode_for("/d/x", group)  # the new revision's group: a new inode
    assert new != old
    table.handed_out(new)
    table.forget(old, 1)
    assert table.path(old) is None and table.current("/d/x") == new
    assert table.inode_for("/d/z", group) == new


def test_an_entry_for_a_forgotten_inode_is_not_kept() -> None:
    table = InodeTable(ROOT)
    inode = table.inode_for("/a")
    table.handed_out(inode)
    table.forget(inode, 1)
    table.set_entry(inode, _entry("/a"))  # a live update that raced with the forget
    assert table.entry(inode) is None and len(table) == 1
