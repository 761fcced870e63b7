"""``cvmfs://`` through fsspec: the reference repository, configuration lookup, fsspec's own
abstract "get" suite run against a published repository, and read-only behaviour."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import sys
from collections.abc import Iterator
from hashlib import md5
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.get import AbstractGetTests

from cvmfs_ml.client.fsspec import CvmfsFileSystem
from cvmfs_ml.cvmfs.manifest import FqrnMismatchError
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

REF = "ref.test.local"


@pytest.fixture
def ref_fs(reference_repo: Path, tmp_path: Path) -> Iterator[CvmfsFileSystem]:
    fs = CvmfsFileSystem(
        url=str(reference_repo / "cvmfs" / REF),
        public_key=str(reference_repo / "keys" / f"{REF}.pub"),
        cache=str(tmp_path / "cache"),
        skip_instance_cache=True,
    )
    yield fs
    fs.close()


def _manifest(reference_repo: Path) -> list[dict]:
    return json.loads((reference_repo / "manifest-v2.json").read_text())


def test_entry_point_registers_the_protocol() -> None:
    assert fsspec.get_filesystem_class("cvmfs") is CvmfsFileSystem


def test_every_file_matches_the_reference(ref_fs: CvmfsFileSystem, reference_repo: Path) -> None:
    for item in _manifest(reference_repo):
        path = f"{REF}/{item['path']}"
        info = ref_fs.info(path)
        if item["type"] == "file":
            assert info["type"] == "file" and info["size"] == item["size"], path
            assert hashlib.sha256(ref_fs.cat(path)).hexdigest() == item["sha256"], path
            with ref_fs.open(path, "rb") as handle:
                assert hashlib.sha256(handle.read()).hexdigest() == item["sha256"], path
            assert info["mode"] & 0o7777 == int(item["mode"], 8)
        elif item["type"] == "dir":
            assert info["type"] == "directory" and ref_fs.isdir(path)
        else:
            assert info["islink"] and info["destination"] == item["target"]


def test_listing_find_and_symlinks(ref_fs: CvmfsFileSystem, reference_repo: Path) -> None:
    top = ref_fs.ls(REF, detail=False)
    assert f"{REF}/hello.txt" in top and f"{REF}/nested" in top
    nested = {i["name"]: i for i in ref_fs.ls(f"{REF}/nested")}
    assert {f"{REF}/nested/a.txt", f"{REF}/nested/inner"} <= set(nested)
    assert nested[f"{REF}/nested/inner"]["type"] == "directory"
    assert ref_fs.ls(f"{REF}/hello.txt", detail=False) == [f"{REF}/hello.txt"]
    files = set(ref_fs.find(REF))
    expected = {f"{REF}/{i['path']}" for i in _manifest(reference_repo) if i["type"] == "file"}
    assert expected <= files
    assert f"{REF}/deep/a/b/c/d/e/f/g/h/i/j/deep.txt" in files
    link = ref_fs.info(f"{REF}/link-to-hello")
    assert link["type"] == "file" and link["size"] == ref_fs.size(f"{REF}/hello.txt")
    assert ref_fs.cat(f"{REF}/nested/link-up") == ref_fs.cat(f"{REF}/hello.txt")
    dangling = ref_fs.info(f"{REF}/abs-dangling-link")
    assert dangling["type"] == "other" and dangling["islink"]
    assert ref_fs.info("")["type"] == "directory"
    assert ref_fs.ls("", detail=False) == [REF]


def test_missing_paths_raise_file_not_found(ref_fs: CvmfsFileSystem) -> None:
    for call in (ref_fs.info, ref_fs.cat, ref_fs.ls, ref_fs.open):
        with pytest.raises(FileNotFoundError):
            call(f"{REF}/no/such/thing")
    assert not ref_fs.exists(f"{REF}/no/such/thing")
    assert ref_fs.exists(f"{REF}/hello.txt")
    with pytest.raises(FileNotFoundError):
        ref_fs.info("other.repo.that.is.not.configured/x")


def test_seek_read_and_ranges(ref_fs: CvmfsFileSystem) -> None:
    path = f"{REF}/big/random-24MiB.bin"
    whole = ref_fs.cat(path)
    assert len(whole) == 25165824
    with ref_fs.open(path, block_size=1 << 16) as handle:
        assert handle.size == len(whole) and handle.seekable()
        spans = [(0, 10), (12_345_678, 3_000_000), (len(whole) - 5, 100), (777_556, 2)]
        for offset, size in spans:
            handle.seek(offset)
            assert handle.read(size) == whole[offset : offset + size]
        assert handle.pread(8, 100) == whole[100:108]
        handle.seek(-3, os.SEEK_END)
        assert handle.read() == whole[-3:]
    assert ref_fs.cat_file(path, start=100, end=200) == whole[100:200]
    assert ref_fs.cat_file(path, start=-50) == whole[-50:]
    assert ref_fs.cat_file(path, start=10, end=-10) == whole[10:-10]
    assert ref_fs.cat_file(path, start=30, end=20) == b""
    assert ref_fs.read_block(path, 1000, 50) == whole[1000:1050]
    with ref_fs.open(f"{REF}/hello.txt", "r") as text:
        assert text.read().startswith("Hello from the CernVM-FS")


def test_writes_are_refused(ref_fs: CvmfsFileSystem) -> None:
    for attempt in (
        lambda: ref_fs.open(f"{REF}/new.txt", "wb"),
        lambda: ref_fs.pipe(f"{REF}/new.txt", b"x"),
        lambda: ref_fs.mkdir(f"{REF}/newdir"),
        lambda: ref_fs.rm(f"{REF}/hello.txt"),
        lambda: ref_fs.touch(f"{REF}/hello.txt"),
    ):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS


def test_url_form_and_pickling(reference_repo: Path, tmp_path: Path) -> None:
    options = {
        "url": str(reference_repo / "cvmfs" / REF),
        "public_key": str(reference_repo / "keys" / f"{REF}.pub"),
        "cache": str(tmp_path / "cache"),
    }
    with fsspec.open(f"cvmfs://{REF}/nested/b.txt", "rb", **options) as handle:
        handle.seek(100)
        assert handle.read(4) == b"sted"
    options["server_url"] = options.pop("url")  # url_to_fs takes `url` itself
    fs, path = fsspec.core.url_to_fs(f"cvmfs://{REF}/hello.txt", **options)
    assert isinstance(fs, CvmfsFileSystem) and path == f"{REF}/hello.txt" and fs.fqrn == REF
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat(path) == fs.cat(path)


def test_fqrn_resolved_through_configuration(reference_repo: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = RepositoryServer(reference_repo / "cvmfs").start()
    try:
        config = tmp_path / "site.conf"
        config.write_text(
            f"CVMFS_SERVER_URL='{server.url}/cvmfs/@fqrn@'\n"
            "CVMFS_HTTP_PROXY=DIRECT\n"
            f"CVMFS_KEYS_DIR={reference_repo / 'keys'}\n"
            f"CVMFS_CACHE_BASE={tmp_path / 'cachebase'}\n"
        )
        monkeypatch.setenv("CVMFS_ML_CONFIG", str(config))
        with fsspec.open(f"cvmfs://{REF}/hello.txt", "rb", skip_instance_cache=True) as handle:
            assert handle.read().startswith(b"Hello from the CernVM-FS")
        assert server.wait_for_requests(1, timeout=60) > 0  # counted after the answer went out
        assert any((tmp_path / "cachebase").rglob("*")), "objects go to CVMFS_CACHE_BASE"
    finally:
        server.stop()


# -- fsspec's own abstract suite ("get": copying out of the filesystem) -------------------------
def _scenario_files() -> dict[str, bytes]:
    files = {}
    for top in ("bulk", "glob"):
        base = f"{top}/source"
        files[f"{base}/file1"] = b""
        files[f"{base}/file2"] = b""
        subdirs = ["subdir"] if top == "bulk" else ["subdir0", "subdir1"]
        for sub in subdirs:
            files[f"{base}/{sub}/subfile1"] = b""
            files[f"{base}/{sub}/subfile2"] = b""
            files[f"{base}/{sub}/nesteddir/nestedfile"] = b""
    files["prefix/source/subdir.txt"] = b""
    files["prefix/source/subdir/subfile.txt"] = b""
    for i in range(10):
        files[f"hashed/source/{md5(str(i).encode()).hexdigest()}.txt"] = str(i).encode()
    files["recursive/src/file"] = b""
    return files


@pytest.fixture(scope="module")
def scenario_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fsspec")
    tree = base / "tree"
    for rel, data in _scenario_files().items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    settings = PublishSettings(workers=2)
    publisher = create_repository(base / "srv", "abstract.test", settings=settings)
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.commit()
    return publisher.repo_dir


class TestAbstractGet(AbstractFixtures, AbstractGetTests):
    """fsspec's shipped tests for ``get``; the scenarios are published instead of written."""

    @pytest.fixture
    def fs(self, scenario_repo: Path, tmp_path: Path) -> CvmfsFileSystem:
        return CvmfsFileSystem(url=str(scenario_repo), cache=str(tmp_path / "cache"),
                               skip_instance_cache=True)  # fmt: skip

    @pytest.fixture
    def fs_path(self) -> str:
        return "abstract.test"

    @pytest.fixture
    def fs_bulk_operations_scenario_0(self) -> str:
        return "abstract.test/bulk/source"

    @pytest.fixture
    def fs_glob_edge_cases_files(self) -> str:
        return "abstract.test/glob/source"

    @pytest.fixture
    def fs_dir_and_file_with_same_name_prefix(self) -> str:
        return "abstract.test/prefix/source"

    @pytest.fixture
    def fs_10_files_with_hashed_names(self) -> str:
        return "abstract.test/hashed/source"

    def test_get_directory_recursive(self, fs, fs_join, fs_path, local_fs, local_join,  # type: ignore[no-untyped-def]
                                     local_target):  # fmt: skip
        # The shipped version first makes ``src/file`` with fs.mkdir and fs.touch, which a
        # read-only file system refuses; here it is published, and the checks are the same.
        src = fs_join(fs_path, "recursive", "src")
        target = local_target
        assert not local_fs.exists(target)
        for loop in range(2):
            fs.get(src, target, recursive=True)
            assert local_fs.isdir(target)
            assert local_fs.isfile(local_join(target, "file"))
            if loop == 0:
                assert not local_fs.exists(local_join(target, "src"))
            else:
                assert local_fs.isfile(local_join(target, "src", "file"))
        local_fs.rm(target, recursive=True)
        for _ in range(2):
            fs.get(src + "/", target, recursive=True)
            assert local_fs.isfile(local_join(target, "file"))
            assert not local_fs.exists(local_join(target, "src"))


def test_unknown_storage_options_are_refused_naming_them(reference_repo: Path) -> None:
    """Before, an option fsspec passed on that we do not know (a typo) was dropped silently,
    and the reader met "cannot open repository" later, far from the cause."""
    with pytest.raises(ConfigError, match=r"'server_ulr' \(did you mean 'server_url'\?\)"):
        fsspec.filesystem("cvmfs", server_ulr=str(reference_repo / "cvmfs" / "ref.test.local"))
    with pytest.raises(ConfigError, match=r"unknown storage option 'repo';.*server_url"):
        fsspec.open("cvmfs://ref.test.local/README", repo="/srv/cvmfs").open()
    # fsspec's own options, which every filesystem takes, still pass
    fs = fsspec.filesystem(
        "cvmfs", server_url=str(reference_repo / "cvmfs" / "ref.test.local"),
        use_listings_cache=False, listings_expiry_time=5, skip_instance_cache=True,
    )  # fmt: skip
    assert fs.ls("ref.test.local", detail=False)


class _FsspecsOwnWalk(CvmfsFileSystem):
    """Our filesystem with fsspec's recursive walk, as the reference for ours."""

    def walk(self, path: str, maxdepth: int | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("enter_links", False)
        return AbstractFileSystem.walk(self, path, maxdepth=maxdepth, **kwargs)


@pytest.mark.parametrize(
    "options",
    [{}, {"maxdepth": 1}, {"maxdepth": 3}, {"topdown": False}, {"topdown": False, "maxdepth": 2},
     {"detail": True}, {"prune": "deep"}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
@pytest.mark.parametrize("root", ["", REF, f"{REF}/deep"])
def test_walk_yields_what_fsspecs_walk_does(
    reference_repo: Path, tmp_path: Path, root: str, options: dict[str, Any]
) -> None:
    """Our walk keeps its levels on a stack instead of recursing; what it yields, in what
    order, with ``maxdepth``, bottom-up, details and a top-down caller pruning ``dirs``, is
    what fsspec's own walk yields on the same repository (upstream's reference one)."""
    options = dict(options)  # the parameter is shared between the roots
    prune = options.pop("prune", None)

    def walked(cls: type[CvmfsFileSystem]) -> list[Any]:
        fs = cls(url=str(reference_repo / "cvmfs" / REF), cache=str(tmp_path / "cache"),
                 public_key=str(reference_repo / "keys" / f"{REF}.pub"),
                 skip_instance_cache=True)  # fmt: skip
        out = []
        for top, dirs, files in fs.walk(root, **options):
            out.append((top, json.dumps(dirs, sort_keys=True, default=str),
                        json.dumps(files, sort_keys=True, default=str)))  # fmt: skip
            if prune in dirs:
                dirs.remove(prune)  # a top-down caller skipping a folder
        fs.close()
        return out

    ours = walked(CvmfsFileSystem)
    assert ours == walked(_FsspecsOwnWalk)
    assert len(ours) > 1 or options.get("maxdepth") == 1


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path: Path) -> None:
    """fsspec's recursive walk ended in RecursionError below ~1000 levels; a user-pub tarball
    can hold such a tree, and ``find`` over the repository then failed for everyone."""
    depth = sys.getrecursionlimit() + 200
    leaf = "/" + "/".join(["d"] * depth) + "/leaf.txt"
    publisher = create_repository(tmp_path / "srv", "deep.test")
    with publisher.transaction() as txn:
        txn.add_bytes(leaf, b"at the bottom\n")
        txn.commit()
    fs = CvmfsFileSystem(url=str(publisher.repo_dir), cache=str(tmp_path / "cache"),
                         skip_instance_cache=True)  # fmt: skip
    assert fs.find("deep.test") == [f"deep.test{leaf}"]
    assert fs.du("deep.test") == len(b"at the bottom\n")
    assert len(list(fs.walk("deep.test", topdown=False))) == depth + 1
    fs.close()


def test_the_fqrn_given_is_the_one_verified(reference_repo: Path, tmp_path: Path) -> None:
    """``fqrn`` names the repository the manifest must belong to, whatever the location's
    name: a folder of another repository's signed files is refused under the name given (it
    was served as that repository), and a mirror folder named otherwise is read as ``fqrn``."""
    options = {"public_key": str(reference_repo / "keys" / f"{REF}.pub"),
               "cache": str(tmp_path / "cache"), "skip_instance_cache": True}  # fmt: skip
    other = CvmfsFileSystem(server_url=str(reference_repo / "cvmfs" / REF), fqrn="other.org",
                            **options)  # fmt: skip
    with pytest.raises(FqrnMismatchError, match=r"other\.org"):
        other.cat("other.org/hello.txt")
    mirror = tmp_path / "mirror"
    mirror.symlink_to(reference_repo / "cvmfs" / REF)
    fs = CvmfsFileSystem(server_url=str(mirror), fqrn=REF, **options)
    assert fs.cat(f"{REF}/hello.txt").startswith(b"Hello from the CernVM-FS")
