"""Our reader against the upstream reference repository: every revision, every file, ``check``."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.hashing import Digest

# Root catalogs per revision, from the fixture's README.
REVISIONS = {
    0: "883085f6f0f44d22c81b908fa5e5db9afa1d6d7f",
    1: "9d33f37a784de911b5e43f04e07f1533160c888d",
    2: "90b61445795acf2846e71eb07579d200eae4a1e0",
    3: "f423a05b8928434eebf9698fb5b8a15211eb724a",
}


def open_reference(reference_repo: Path, **options) -> Repository:
    return Repository.open(
        reference_repo / "cvmfs" / "ref.test.local",
        public_key=reference_repo / "keys" / "ref.test.local.pub",
        **options,
    )


def tree_of(repo: Repository) -> list[dict]:
    """The tree in the fixture's manifest-vN.json format (sorted, relative paths)."""
    out = []
    for entry in repo.walk():
        item = {"path": entry.path.lstrip("/"), "mode": f"{stat.S_IMODE(entry.mode):04o}"}
        if entry.is_dir:
            item["type"] = "dir"
        elif entry.is_symlink:
            item.update(type="symlink", target=repo.readlink(entry.path), size=entry.size)
        else:
            data = repo.read_bytes(entry.path)
            assert len(data) == entry.size
            item.update(type="file", size=entry.size, sha256=hashlib.sha256(data).hexdigest())
        out.append(item)
    return sorted(out, key=lambda i: i["path"])


def expected_tree(reference_repo: Path, version: int) -> list[dict]:
    items = json.loads((reference_repo / f"manifest-v{version}.json").read_text())
    for item in items:
        item.pop("nlink", None)  # hard links are not kept by upstream either (fixture README)
    return sorted(items, key=lambda i: i["path"])


@pytest.mark.parametrize(
    ("tag", "version"), [("v2", 2), ("trunk", 2), ("v1", 1), ("trunk-previous", 1)]
)
def test_tags_read_back_exactly(reference_repo: Path, tag: str, version: int) -> None:
    with open_reference(reference_repo, tag=tag) as repo:
        assert tree_of(repo) == expected_tree(reference_repo, version)


def test_head_is_revision_3_and_every_revision_opens(reference_repo: Path) -> None:
    with open_reference(reference_repo) as head:
        assert head.revision == 3
        assert head.manifest.catalog.hex == REVISIONS[3]
        assert {t.name: t.root_catalog.hex for t in head.tags()}["v1"] == REVISIONS[2]
    for revision, root in REVISIONS.items():
        with open_reference(reference_repo, root_hash=Digest.from_hex(root)) as repo:
            assert repo.revision == revision
            names = {e.name for e in repo.listdir("/")}
            assert ("new_repository" in names) == (revision in (1, 2))


def test_nested_catalog_and_chunked_files(reference_repo: Path) -> None:
    with open_reference(reference_repo) as repo:
        mount = repo.stat("/nested")
        assert mount.is_nested_mountpoint and mount.flags == 3
        assert {e.name for e in repo.listdir("/nested")} == {
            ".cvmfscatalog",
            "a.txt",
            "b.txt",
            "inner",
            "link-up",
        }
        big = repo.layout("/big/random-24MiB.bin")
        assert big.chunked and len(big.pieces) == 26
        zeros = repo.layout("/zeros-20MiB.bin")
        assert len(zeros.pieces) == 10 and len({p.digest for p in zeros.pieces}) == 1
        # Reads that straddle chunk boundaries, at odd offsets.
        with repo.open_file("/big/random-24MiB.bin") as handle:
            whole = handle.read()
            for offset in (0, 777556, 777557, 5_000_001, len(whole) - 3):
                handle.seek(offset)
                assert handle.read(100_000) == whole[offset : offset + 100_000]
        assert repo.resolve("/nested/link-up").path == "/hello.txt"


def test_repo_check_passes_on_the_reference(reference_repo: Path) -> None:
    with open_reference(reference_repo) as repo:
        report = check_repository(repo)
    assert report.ok, report.problems
    # HEAD (revision 3) and the tagged revision 2, each a root plus the /nested catalog.
    assert report.catalogs == 4
    assert sorted(report.revisions) == [2, 3]
    assert report.objects == 43  # 15 whole files + 27 chunks, deduplicated, + meta-info
