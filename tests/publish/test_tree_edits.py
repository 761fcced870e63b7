"""Issue 9, item 2: tree edits below a file or symlink are refused; markers make nested catalogs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.publish.tree import TreeEditor

from .conftest import write_tree
from .test_hostile_ingest import assert_refused, cli, open_repo


def assert_clean_and_nested(repo: Repository, *paths: str) -> None:
    report = check_repository(repo)
    assert report.ok, report.problems
    for path in paths:
        entry = repo.stat(path)
        assert entry.is_nested_mountpoint or entry.is_nested_root, path


@pytest.fixture
def publisher(make_repo, tmp_path: Path) -> Publisher:  # type: ignore[no-untyped-def]
    publisher = make_repo()
    src = write_tree(
        tmp_path / "base",
        {"sub/ok": b"a file", "sub/link": "->ok", "sub/dir/x": b"x", "sub/dir/deep/y": b"y"},
    )
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit()
    return publisher


@pytest.mark.parametrize("at", ["/sub/ok/inside", "/sub/ok", "/sub/link/inside", "/sub/ok/a/b"])
def test_at_below_a_file_or_symlink_is_refused(publisher: Publisher, tmp_path: Path, at: str):
    small = write_tree(tmp_path / "small", {"f": b"new"})
    if at == "/sub/ok":  # replacing a file by a folder is an ordinary edit, not a refusal
        result = cli("repo", "publish", str(publisher.repo_dir), str(small), "--at", at)
        assert result.returncode == 0, result.stderr
        with open_repo(publisher) as repo:
            assert repo.read_bytes("/sub/ok/f") == b"new"
            assert check_repository(repo).ok
        return
    line = assert_refused(publisher, small, "--at", at, match="not a directory")
    assert at.split("/")[2] in line
    # The next publish is fine too (nothing half-done was left behind).
    result = cli("repo", "publish", str(publisher.repo_dir), str(small), "--at", "/elsewhere")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("edit", ["add_bytes", "mkdir", "symlink"])
def test_api_edits_below_a_file_are_refused(publisher: Publisher, edit: str) -> None:
    revision = publisher.manifest().revision
    with publisher.transaction() as txn:
        if edit == "add_bytes":
            txn.add_bytes("/sub/ok/meta.json", b"{}")
        elif edit == "mkdir":
            txn.mkdir("/sub/link/newdir")
        else:
            txn.symlink("/sub/ok/l", "x")
        with pytest.raises(PublishError, match="not a directory"):
            txn.commit()
    assert publisher.manifest().revision == revision
    with open_repo(publisher) as repo:
        assert check_repository(repo).ok


def test_marker_added_to_an_existing_directory_makes_a_nested_catalog(publisher: Publisher):
    with publisher.transaction() as txn:  # a nested catalog below the one about to be split
        txn.add_bytes("/sub/dir/deep/.cvmfscatalog", b"")
        txn.commit()
    with publisher.transaction() as txn:
        txn.add_bytes("/sub/dir/.cvmfscatalog", b"")
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, *("/sub/dir", "/sub/dir/deep"))
        assert repo.read_bytes("/sub/dir/x") == b"x"
        assert repo.read_bytes("/sub/dir/deep/y") == b"y"
        assert repo.read_bytes("/sub/ok") == b"a file"
    with publisher.transaction() as txn:  # the split tree keeps working
        txn.add_bytes("/sub/dir/deep/z", b"z")
        txn.remove("/sub/dir/x")
        txn.commit()
    with open_repo(publisher) as repo:
        assert check_repository(repo).ok
        assert repo.read_bytes("/sub/dir/deep/z") == b"z"
        assert not repo.exists("/sub/dir/x")


def test_marker_in_a_published_folder_again_is_nested_too(publisher: Publisher, tmp_path: Path):
    src = write_tree(tmp_path / "again", {"dir/.cvmfscatalog": b"", "dir/x": b"x2"})
    result = cli("repo", "publish", str(publisher.repo_dir), str(src), "--at", "/sub")
    assert result.returncode == 0, result.stderr
    with open_repo(publisher) as repo:
        assert check_repository(repo).ok
        assert repo.read_bytes("/sub/dir/x") == b"x2"
        assert repo.read_bytes("/sub/dir/deep/y") == b"y"


def test_check_reports_a_marker_not_at_a_catalog_root(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the old publisher did: the marker lands in the parent catalog, no nested catalog.
    monkeypatch.setattr(TreeEditor, "make_catalog_root", lambda self, path: None)
    with publisher.transaction() as txn:
        txn.add_bytes("/sub/dir/.cvmfscatalog", b"")
        txn.commit()
    with open_repo(publisher) as repo:
        report = check_repository(repo)
    assert not report.ok
    assert any("/sub/dir/.cvmfscatalog" in p and "catalog root" in p for p in report.problems)
    result = cli("repo", "check", str(publisher.repo_dir))
    assert result.returncode == 1 and b"not at a catalog root" in result.stderr


def test_split_with_a_new_nested_catalog_below(publisher: Publisher, tmp_path: Path) -> None:
    src = write_tree(
        tmp_path / "both",
        {".cvmfscatalog": b"", "x": b"x3", "new/.cvmfscatalog": b"", "new/f": b"f"},
    )
    with publisher.transaction() as txn:
        txn.add_folder(src, "/sub/dir")  # /sub/dir exists as a plain directory
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, *("/sub/dir", "/sub/dir/new"))
        assert repo.read_bytes("/sub/dir/new/f") == b"f"
        assert repo.read_bytes("/sub/dir/deep/y") == b"y"


def test_removing_a_marker_merges_the_catalog_back(publisher: Publisher, tmp_path: Path) -> None:
    with publisher.transaction() as txn:  # /sub/dir nested, /sub/dir/deep nested below it
        txn.add_bytes("/sub/dir/deep/.cvmfscatalog", b"")
        txn.add_bytes("/sub/dir/.cvmfscatalog", b"")
        txn.commit()
    with publisher.transaction() as txn:  # republishing with the marker keeps the catalog
        txn.add_bytes("/sub/dir/.cvmfscatalog", b"")
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, "/sub/dir", "/sub/dir/deep")
    with publisher.transaction() as txn:
        txn.remove("/sub/dir/.cvmfscatalog")
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, "/sub/dir/deep")
        entry = repo.stat("/sub/dir")
        assert not (entry.is_nested_mountpoint or entry.is_nested_root)
        assert repo.read_bytes("/sub/dir/x") == b"x"
        assert repo.read_bytes("/sub/dir/deep/y") == b"y"
        assert entry.linkcount == 3  # itself, ".", and deep
    with publisher.transaction() as txn:  # and the last one, back into the root catalog
        txn.remove("/sub/dir/deep/.cvmfscatalog")
        txn.commit()
    with open_repo(publisher) as repo:
        report = check_repository(repo)
        assert report.ok, report.problems
        assert not repo.stat("/sub/dir/deep").is_nested_mountpoint
        assert repo.read_bytes("/sub/dir/deep/y") == b"y"


def test_merging_keeps_hard_link_groups_apart(publisher: Publisher, tmp_path: Path) -> None:
    import io
    import tarfile

    def links(directory: str) -> Path:
        path = tmp_path / f"{directory}.tar"
        with tarfile.open(path, "w") as archive:
            info = tarfile.TarInfo(f"{directory}/f")
            info.size = 3
            archive.addfile(info, io.BytesIO(directory.encode()[:3].ljust(3)))
            link = tarfile.TarInfo(f"{directory}/g")
            link.type, link.linkname = tarfile.LNKTYPE, f"{directory}/f"
            archive.addfile(link)
        return path

    with publisher.transaction() as txn:
        txn.add_bytes("/h/n/.cvmfscatalog", b"")
        txn.commit()
    with publisher.transaction() as txn:  # group 1 in the root catalog and in /h/n's
        txn.add_tarball(links("one"), "/h")
        txn.add_tarball(links("two"), "/h/n")
        txn.commit()
    with open_repo(publisher) as repo:
        assert repo.stat("/h/one/f").hardlink_group == repo.stat("/h/n/two/f").hardlink_group == 1
    with publisher.transaction() as txn:
        txn.remove("/h/n/.cvmfscatalog")
        txn.commit()
    with open_repo(publisher) as repo:
        assert check_repository(repo).ok
        one = {repo.stat(f"/h/one/{n}").hardlink_group for n in "fg"}
        two = {repo.stat(f"/h/n/two/{n}").hardlink_group for n in "fg"}
        assert len(one) == len(two) == 1 and one != two


def test_nested_catalogs_chained_deep_publish_and_edit(publisher: Publisher) -> None:
    """A nested catalog at each of 120 levels (the walk to a path's catalog starts at the
    deepest open one now; scanning every open catalog at every level was cubic in the depth,
    and a 1500-level upload kept the publisher busy for over ten minutes)."""
    depth = 120
    levels = ["/deep" + "/a" * i for i in range(1, depth + 1)]
    with publisher.transaction() as txn:
        for level in levels:
            txn.add_bytes(f"{level}/.cvmfscatalog", b"")
            txn.add_bytes(f"{level}/f", level.encode())
        txn.commit()
    with publisher.transaction() as txn:  # edits at both ends of the chain, catalogs reopened
        txn.add_bytes(f"{levels[-1]}/g", b"last")
        txn.add_bytes(f"{levels[0]}/g", b"first")
        txn.remove(f"{levels[depth // 2]}/f")
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, *levels)
        assert repo.read_bytes(f"{levels[-1]}/g") == b"last"
        assert repo.read_bytes(f"{levels[0]}/g") == b"first"
        assert not repo.exists(f"{levels[depth // 2]}/f")
        assert all(repo.read_bytes(f"{lv}/f") == lv.encode() for lv in levels[depth // 2 + 1 :])
