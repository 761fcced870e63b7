"""Upstream parity of the read side (issue 8, item 5) and aliases in paths (item 7).

One repository (``parity_repo``) holds external files, variant and absolute symlinks, aliases,
devices, a name that is not UTF-8 and a hidden entry; it is served by nginx (with the external
files beside it) and read through the client API, fsspec and a FUSE mount. What each must show
is what cvmfs-format.md says upstream's client shows.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

from cvmfs_ml.client.config import external_config
from cvmfs_ml.client.entries import device_number, hardlink_key
from cvmfs_ml.client.external import ExternalSource
from cvmfs_ml.client.files import DROP_BEHIND_PIECES
from cvmfs_ml.client.fsspec import CvmfsFileSystem
from cvmfs_ml.client.locate import open_target
from cvmfs_ml.client.repository import CvmfsFile, Repository
from cvmfs_ml.cvmfs.symlinks import expand_variant_symlink
from cvmfs_ml.errors import ConfigError, UnsafeInputError
from cvmfs_ml.testing import Nginx, Squid
from parity_repo import (
    BLOCK_DEV,
    CHAR_DEV,
    EXTERNAL_DIR,
    FQRN,
    HARDLINKS,
    LATIN1_NAME,
    ParityRepo,
    publish_parity_repo,
)

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> ParityRepo:
    return publish_parity_repo(tmp_path_factory.mktemp("parity"))


@pytest.fixture
def served(nginx_factory: Callable[..., Nginx], parity: ParityRepo) -> Nginx:
    return nginx_factory(parity.root)


def _config(tmp_path: Path, server: Nginx, **extra: str) -> Path:
    lines = [f"CVMFS_SERVER_URL={server.repo_url(FQRN)}"]
    lines += [f"{key}={value}" for key, value in extra.items()]
    path = tmp_path / "client.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def repo(served: Nginx, parity: ParityRepo, tmp_path: Path) -> Iterator[Repository]:
    with Repository.connect(
        served.repo_url(FQRN),
        public_key=parity.public_key,
        cache=tmp_path / "cache",
        external_url=f"{served.url}/cvmfs/{EXTERNAL_DIR}",
        symlink_variables={"PARITY_SITE": "cern"},
    ) as repository:
        yield repository


# -- variant symlinks: upstream's ExpandSymlink rules --------------------------------------------
@pytest.mark.parametrize(
    ("target", "variables", "expanded"),
    [
        ("$(A)/x", {"A": "a"}, "a/x"),
        ("$(A:-d)/x", {}, "d/x"),
        ("$(A:-d)/x", {"A": ""}, "/x"),  # set but empty: the value, not the default
        ("x$(A)y", {}, "xy"),  # unset without default: nothing
        ("$(A)$(B:-b)", {"A": "a"}, "ab"),
        ("$(A", {"A": "a"}, "$(A"),  # no closing parenthesis: kept
        ("$A/$(", {"A": "a"}, "$A/$("),
        ("$(A:-x:-y)", {}, "x:-y"),  # the first ":-" separates
        ("plain", {}, "plain"),
    ],
)
def test_variant_symlink_expansion(target: str, variables: dict, expanded: str) -> None:
    assert expand_variant_symlink(target, variables) == expanded


# -- the client API -------------------------------------------------------------------------------
def _external_requests(server: Nginx, expect: int, timeout: float = 60.0) -> list:
    """The external-data requests in the access log, once ``expect`` of them are there (nginx
    logs a request after its response went out), or what there is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in server.requests() if r.path.startswith(f"/cvmfs/{EXTERNAL_DIR}/")]
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_external_files_come_from_the_external_url_with_ranges(
    repo: Repository, served: Nginx, parity: ParityRepo
) -> None:
    assert repo.read_bytes("/ext/big.bin") == parity.original("/ext/big.bin")
    assert repo.read_bytes("/ext/small.txt") == parity.original("/ext/small.txt")
    pieces = repo.layout("/ext/big.bin").pieces
    external = _external_requests(served, len(pieces) + 1)
    ranged = [r for r in external if r.path.endswith("/big.bin")]
    assert len(pieces) >= 3 and len(ranged) == len(pieces)
    assert {r.range for r in ranged} == {
        f"bytes={p.offset}-{p.offset + p.size - 1}" for p in pieces
    }
    assert all(r.status == 206 for r in ranged)
    small = [r for r in external if r.path.endswith("/small.txt")]
    assert len(small) == 1 and small[0].range is None and small[0].status == 200
    # the Stratum 1 was never asked for external data, and stays the host in use
    assert repo.source.stats.failovers == 0
    assert repo.source.current_host == served.repo_url(FQRN)


def test_external_file_without_external_url_is_a_clear_error(
    served: Nginx, parity: ParityRepo, tmp_path: Path
) -> None:
    with Repository.connect(
        served.repo_url(FQRN), public_key=parity.public_key, cache=tmp_path / "c"
    ) as repo:
        with pytest.raises(ConfigError, match="CVMFS_EXTERNAL_URL"):
            repo.read_bytes("/ext/small.txt")
        assert repo.read_bytes("/hep/tagger/prod/tagger.onnx")  # the rest still reads
        assert repo.source.stats.failovers == 0


def test_external_file_missing_on_the_external_server_leaves_the_stratum1_alone(
    served: Nginx, parity: ParityRepo, tmp_path: Path
) -> None:
    with Repository.connect(
        served.repo_url(FQRN), public_key=parity.public_key, cache=tmp_path / "c",
        external_url=f"{served.url}/cvmfs/nowhere",
    ) as repo:  # fmt: skip
        with pytest.raises(OSError, match="404"):
            repo.read_bytes("/ext/small.txt")
        assert repo.source.stats.failovers == 0
        assert repo.source.current_host == served.repo_url(FQRN)
        assert repo.read_bytes("/links/cern/conf.txt") == b"site=cern\n"


def test_symlinks_as_upstream_shows_them(repo: Repository, parity: ParityRepo) -> None:
    assert repo.readlink("/links/variant") == "cern/conf.txt"
    assert repo.raw_readlink("/links/variant") == "$(PARITY_SITE:-default)/conf.txt"
    assert repo.stat("/links/variant").size == len("cern/conf.txt")
    assert repo.read_bytes("/links/variant") == b"site=cern\n"
    assert repo.readlink("/links/bare") == "xy"
    listed = {e.name: e for e in repo.listdir("/links")}
    assert listed["variant"].symlink == "cern/conf.txt"
    # absolute targets are returned as they are, never looked up inside the repository
    assert repo.readlink("/links/abs") == "/etc/hostname"
    with pytest.raises(UnsafeInputError, match="outside repository"):
        repo.resolve("/links/abs")
    inside = repo.resolve("/links/abs-in")
    assert inside.path == "/hep/tagger/1/tagger.onnx"


def test_variant_default_when_the_variable_is_unset(
    served: Nginx, parity: ParityRepo, tmp_path: Path
) -> None:
    with Repository.connect(
        served.repo_url(FQRN), public_key=parity.public_key, cache=tmp_path / "c",
        symlink_variables={},
    ) as repo:  # fmt: skip
        assert repo.readlink("/links/variant") == "default/conf.txt"
        assert repo.read_bytes("/links/variant") == b"site=default\n"


def test_aliases_resolve_in_every_component(repo: Repository, parity: ParityRepo) -> None:
    want = parity.original("/hep/tagger/1/tagger.onnx")
    for alias in ("prod", "latest"):
        assert repo.read_bytes(f"/hep/tagger/{alias}/tagger.onnx") == want
    assert repo.resolve("/hep/tagger/latest").path == "/hep/tagger/1"
    assert repo.resolve("/hep/tagger/prod/../1/tagger.onnx").path == "/hep/tagger/1/tagger.onnx"
    with pytest.raises(OSError) as loop:
        repo.resolve("/hep/tagger/loop/x")
    assert loop.value.errno == errno.ELOOP
    with pytest.raises(UnsafeInputError, match="above the repository root"):
        repo.resolve("/hep/tagger/escape/etc/passwd")
    with pytest.raises(FileNotFoundError):
        repo.resolve("/hep/tagger/prod/missing.onnx")
    with pytest.raises(NotADirectoryError):
        repo.resolve("/hep/tagger/prod/tagger.onnx/x")


def test_the_repository_is_consistent(parity: ParityRepo, tmp_path: Path) -> None:
    """``repo check`` passes: external data is not expected in data/, counters add up."""
    from cvmfs_ml.client.check import check_repository

    with Repository.connect(parity.repo_dir, public_key=parity.public_key) as repo:
        report = check_repository(repo, data=True)
    assert report.ok, report.problems
    assert len(report.revisions) >= 2


def test_devices_names_and_hidden_entries(repo: Repository, parity: ParityRepo) -> None:
    assert device_number(repo.stat("/dev/null")) == CHAR_DEV
    assert device_number(repo.stat("/dev/sda")) == BLOCK_DEV
    assert stat.S_ISBLK(repo.stat("/dev/sda").mode)
    assert device_number(repo.stat("/dev/fifo")) == 0
    names = [e.name for e in repo.listdir("/names")]
    assert [os.fsencode(n) for n in names] == [LATIN1_NAME]
    assert repo.read_bytes(f"/names/{names[0]}") == b"latin-1 name\n"
    members = [repo.stat(path) for path in HARDLINKS]
    assert {(e.hardlink_group, e.linkcount) for e in members} == {(1, 2)}
    assert hardlink_key(members[0]) == hardlink_key(members[1]) == ("/links", 1)
    assert hardlink_key(repo.stat("/links/cern/conf.txt")) is None
    assert "hidden.txt" not in {e.name for e in repo.listdir("")}
    assert repo.read_bytes("/hidden.txt") == b"hidden\n"  # hidden, not gone
    assert all(e.name != "hidden.txt" for e in repo.walk())


# -- fsspec ---------------------------------------------------------------------------------------
def test_fsspec_reads_aliases_externals_and_odd_entries(
    served: Nginx, parity: ParityRepo, tmp_path: Path
) -> None:
    config = _config(
        tmp_path, served,
        CVMFS_EXTERNAL_URL=f"{served.url}/cvmfs/{EXTERNAL_DIR}", PARITY_SITE="cern",
    )  # fmt: skip
    fs = CvmfsFileSystem(
        url=served.repo_url(FQRN), public_key=str(parity.public_key), config=str(config),
        cache=str(tmp_path / "cache"), skip_instance_cache=True,
    )  # fmt: skip
    try:
        want = parity.original("/hep/tagger/1/tagger.onnx")
        assert fs.cat(f"{FQRN}/hep/tagger/prod/tagger.onnx") == want
        with fs.open(f"cvmfs://{FQRN}/hep/tagger/latest/tagger.onnx", "rb") as handle:
            assert handle.read() == want
        assert fs.info(f"{FQRN}/hep/tagger/prod/tagger.onnx")["size"] == len(want)
        assert fs.cat(f"{FQRN}/ext/big.bin") == parity.original("/ext/big.bin")
        assert fs.cat(f"{FQRN}/links/variant") == b"site=cern\n"
        assert fs.info(f"{FQRN}/links/abs")["destination"] == "/etc/hostname"
        device = fs.info(f"{FQRN}/dev/null")
        assert device["type"] == "other" and device["size"] == 0
        assert device["rdev"] == CHAR_DEV
        names = fs.ls(f"{FQRN}/names", detail=False)
        assert [os.fsencode(n.rsplit("/", 1)[1]) for n in names] == [LATIN1_NAME]
        assert f"{FQRN}/hidden.txt" not in fs.ls(FQRN, detail=False)
    finally:
        fs.close()
    # fsspec's own url_to_fs(url, ...) takes "url": storage options name the server server_url
    options = {
        "server_url": served.repo_url(FQRN), "public_key": str(parity.public_key),
        "cache_storage": str(tmp_path / "cache"), "skip_instance_cache": True,
    }  # fmt: skip
    with fsspec.open(f"cvmfs://{FQRN}/hep/tagger/prod/tagger.onnx", "rb", **options) as f:
        assert f.read() == want
    with pytest.raises(ConfigError, match="not both"):
        CvmfsFileSystem(url="http://a/cvmfs/x", server_url="http://b/cvmfs/x")


# -- the command line -----------------------------------------------------------------------------
def _repo(parity: ParityRepo, command: str, path: str, *more: str) -> subprocess.CompletedProcess:
    """``cvmfs-ml repo COMMAND <folder> PATH ... --key <key>`` in a subprocess (real stdout)."""
    argv = ["repo", command, str(parity.repo_dir), path, *more, "--key", str(parity.public_key)]
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *argv], capture_output=True, timeout=120
    )


def test_repo_ls_and_cat_show_odd_entries_as_ls_does(parity: ParityRepo) -> None:
    names = _repo(parity, "ls", "/names")
    assert names.returncode == 0, names.stderr
    assert names.stdout.rstrip(b"\n").endswith(b" " + LATIN1_NAME)  # the bytes, as ls shows
    listing = _repo(parity, "ls", "/names", "--json")
    (entry,) = json.loads(listing.stdout.decode("utf-8"))  # valid UTF-8 JSON
    assert os.fsencode(entry["path"]) == b"/names/" + LATIN1_NAME
    cat = _repo(parity, "cat", entry["path"])
    assert cat.returncode == 0 and cat.stdout == b"latin-1 name\n", cat.stderr
    devices = _repo(parity, "ls", "/dev").stdout.decode()
    lines = {line.split()[-1]: line for line in devices.splitlines()}
    assert lines["null"].startswith("c0666") and " 1, 3 " in lines["null"]
    assert lines["sda"].startswith("b0660") and " 8, 0 " in lines["sda"]
    assert lines["fifo"].startswith("p0644")
    described = json.loads(_repo(parity, "stat", "/dev/null").stdout)
    assert described["rdev"] == CHAR_DEV and described["size"] == 0
    alias = _repo(parity, "cat", "/hep/tagger/latest/tagger.onnx")
    assert alias.stdout == parity.original("/hep/tagger/1/tagger.onnx")
    escape = _repo(parity, "cat", "/hep/tagger/escape/etc/passwd")
    assert escape.returncode == 1 and escape.stdout == b""
    (line,) = escape.stderr.decode().strip().splitlines()
    assert "above the repository root" in line


# -- external data through its own proxy chain ----------------------------------------------------
def test_external_settings_from_configuration() -> None:
    assert external_config({}) is None
    external = external_config(
        {
            "CVMFS_EXTERNAL_URL": "http://a.example/x;http://b.example/x",
            "CVMFS_EXTERNAL_HTTP_PROXY": "http://p.example:3128;DIRECT",
            "CVMFS_EXTERNAL_FALLBACK_PROXY": "f.example:3128",
            "CVMFS_EXTERNAL_TIMEOUT": "3",
        }
    )
    assert external is not None
    # as for CVMFS_HTTP_PROXY: fallback proxies go last and DIRECT is dropped
    assert external.proxy_groups == [["http://p.example:3128"], ["http://f.example:3128"]]
    assert (external.timeout, external.timeout_direct) == (3.0, 10.0)
    source = ExternalSource.from_config(external)
    assert source.hosts == ["http://a.example/x", "http://b.example/x"]
    with pytest.raises(ConfigError, match="CVMFS_EXTERNAL_TIMEOUT"):
        external_config({"CVMFS_EXTERNAL_URL": "http://a/x", "CVMFS_EXTERNAL_TIMEOUT": "soon"})


def test_external_data_goes_through_the_external_proxy(
    served: Nginx,
    parity: ParityRepo,
    squid_factory: Callable[..., Squid],
    tmp_path: Path,
) -> None:
    squid = squid_factory()
    config = _config(
        tmp_path, served,
        CVMFS_PUBLIC_KEY=str(parity.public_key), CVMFS_HTTP_PROXY="DIRECT",
        CVMFS_EXTERNAL_URL=f"{served.url}/cvmfs/{EXTERNAL_DIR}",
        CVMFS_EXTERNAL_HTTP_PROXY=squid.url,
    )  # fmt: skip
    with open_target(FQRN, config_files=[config], cache=tmp_path / "cache") as repo:
        assert repo.read_bytes("/ext/big.bin") == parity.original("/ext/big.bin")
        assert repo.read_bytes("/links/cern/conf.txt") == b"site=cern\n"
    through = squid.requests(expect=1)
    assert through and all(f"/cvmfs/{EXTERNAL_DIR}/ext/big.bin" in r.url for r in through)


def test_fsspec_walks_like_os_walk(served: Nginx, parity: ParityRepo, tmp_path: Path) -> None:
    fs = CvmfsFileSystem(
        server_url=served.repo_url(FQRN), public_key=str(parity.public_key),
        cache_storage=str(tmp_path / "cache"), skip_instance_cache=True,
    )  # fmt: skip
    try:
        found = fs.find(FQRN, withdirs=True)
        assert f"{FQRN}/hep/tagger/1/tagger.onnx" in found
        assert f"{FQRN}/hep/tagger/prod" in found  # the alias itself, not a second copy
        assert not [p for p in found if "/prod/" in p or "/latest/" in p]
        # the version once, plus the links that lead nowhere (their own size, as du counts)
        dangling = len("loop") + len("../../..")
        size = len(parity.original("/hep/tagger/1/tagger.onnx"))
        assert fs.du(f"{FQRN}/hep") == size + dangling
        # a walk that starts at an alias enters it
        assert fs.find(f"{FQRN}/hep/tagger/prod") == [f"{FQRN}/hep/tagger/prod/tagger.onnx"]
        fs.get(f"{FQRN}/hep/tagger/prod/", str(tmp_path / "copy"), recursive=True)
        assert (tmp_path / "copy" / "tagger.onnx").read_bytes() == parity.original(
            "/hep/tagger/1/tagger.onnx"
        )
    finally:
        fs.close()


def test_a_file_larger_than_the_cache_gets_a_read_ahead_window(
    served: Nginx, parity: ParityRepo, tmp_path: Path
) -> None:
    def opened(quota: int) -> tuple[Repository, CvmfsFile]:
        repo = Repository.connect(
            served.repo_url(FQRN), public_key=parity.public_key, cache=tmp_path / str(quota),
            quota_bytes=quota, external_url=f"{served.url}/cvmfs/{EXTERNAL_DIR}",
        )  # fmt: skip
        return repo, repo.open_file("/ext/big.bin", prefetch=True)

    quota = 4 * 2**20  # the 3 MB external file is over half of it
    repo, handle = opened(quota)
    with repo, handle:
        assert not handle.prefetched  # not queued whole: a window follows the reader
        largest = max(p.size for p in handle.layout.pieces)
        # the window, with the pieces still open behind the reader, fits in half the quota
        # (what an eviction keeps), so that no piece is evicted before it is read
        fits = (quota // 2) // largest - DROP_BEHIND_PIECES
        assert handle.readahead == max(1, min(repo.readahead_pieces, fits))
        assert (handle.readahead + DROP_BEHIND_PIECES) * largest <= quota // 2
        assert handle.read() == parity.original("/ext/big.bin")
    repo, handle = opened(64 * 2**20)
    with repo, handle:
        assert handle.prefetched
