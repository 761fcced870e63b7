"""Property test: random trees publish and read back identical."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings

MIN, AVG, MAX = 4096, 8192, 16384  # tiny chunks so sizes around the thresholds are cheap
SETTINGS = PublishSettings(min_chunk_size=MIN, avg_chunk_size=AVG, max_chunk_size=MAX, workers=2)

names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\0"),
    min_size=1,
    max_size=20,
).filter(lambda n: n not in (".", "..", ".cvmfscatalog", ".cvmfsdirtab") and len(n.encode()) < 200)
sizes = st.sampled_from([0, 1, MIN - 1, MIN, MIN + 1, AVG, MAX, MAX + 1, 3 * MAX + 17, 70_000])
contents = st.builds(
    lambda size, seed, kind: bytes([seed]) * size if kind else os.urandom(size),
    sizes,
    st.integers(0, 255),
    st.booleans(),
)
node = st.deferred(
    lambda: st.one_of(
        st.tuples(st.just("file"), contents, st.sampled_from([0o644, 0o755, 0o600])),
        st.tuples(st.just("link"), st.sampled_from(["target", "../up", "/abs/path", "x" * 200])),
        st.tuples(st.just("dir"), st.dictionaries(names, node, max_size=4)),
    )
)
trees = st.dictionaries(names, node, min_size=1, max_size=6)


def build(root: Path, tree: dict, depth: int = 0) -> None:
    for name, spec in tree.items():
        path = root / name
        if spec[0] == "file":
            path.write_bytes(spec[1])
            os.chmod(path, spec[2])
            if depth == 0 and spec[1]:
                try:
                    os.setxattr(path, "user.model", name.encode()[:200])
                except OSError:
                    pass  # the file system may not support user xattrs
        elif spec[0] == "link":
            os.symlink(spec[1], path)
        else:
            path.mkdir()
            build(path, spec[1], depth + 1)


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = "/" + str(path.relative_to(root))
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                try:
                    xattrs = {
                        n.encode(): os.getxattr(path, n)
                        for n in os.listxattr(path)
                        if n.startswith("user.")
                    }
                except OSError:
                    xattrs = {}
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes(), xattrs)
    return out


def read_back(repo: Repository) -> dict[str, tuple]:
    out = {}
    for entry in repo.walk():
        if entry.is_symlink:
            out[entry.path] = ("link", entry.symlink)
        elif entry.is_dir:
            out[entry.path] = ("dir", stat.S_IMODE(entry.mode))
        else:
            out[entry.path] = (
                "file",
                stat.S_IMODE(entry.mode),
                repo.read_bytes(entry.path),
                dict(entry.xattrs),
            )
    return out


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees, second=trees)
def test_random_trees_round_trip(tmp_path: Path, tree: dict, second: dict) -> None:
    work = tmp_path / "work"
    shutil.rmtree(work, ignore_errors=True)
    src, src2 = work / "src", work / "src2"
    src.mkdir(parents=True)
    src2.mkdir()
    build(src, tree)
    build(src2, second)
    publisher = create_repository(work / "srv", "prop.test", settings=SETTINGS)
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit()
    with publisher.transaction() as txn:  # a second revision merges another tree below
        txn.add_folder(src2, "/second", nested_catalog=True)
        txn.commit()
    key = publisher.keys.paths.master_public
    with Repository.open(publisher.repo_dir, public_key=key) as repo:
        got = read_back(repo)
    expected = snapshot(src)
    expected["/second"] = ("dir", stat.S_IMODE(src2.stat().st_mode))
    expected.update({"/second" + k: v for k, v in snapshot(src2).items()})
    expected["/second/.cvmfscatalog"] = ("file", 0o644, b"", {})
    assert got == expected
