"""The FUSE mount, end to end: real mounts read by real programs (sha256, cat, cp, onnxruntime).

Every test here mounts for real, so it needs ``/dev/fuse``, ``fusermount3`` and pyfuse3.
Without them the tests skip on a developer machine and fail in CI (``CI`` set). Each mount is
unmounted in the fixture's teardown whatever happens, lazily if it is busy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.client.fuse import MountHandle, is_mounted, mount, unmount
from cvmfs_ml.client.trace import load_trace, summarise_trace
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

pytestmark = pytest.mark.service

REF = "ref.test.local"


@pytest.fixture(scope="module", autouse=True)
def _require_fuse(require_fuse: None) -> None:
    """Every test here mounts (tests/client/conftest.py: skip or, in CI, fail without FUSE)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- the reference repository ---------------------------------------------------------------------
def _check_reference_tree(root: Path, reference_repo: Path) -> None:
    manifest = json.loads((reference_repo / "manifest-v2.json").read_text())
    children: dict[str, set[str]] = {}
    for item in manifest:
        parent, _, name = item["path"].rpartition("/")
        children.setdefault(parent, set()).add(name)
        path = root / item["path"]
        info = os.lstat(path)
        assert stat.S_IMODE(info.st_mode) == int(item["mode"], 8), item["path"]
        if item["type"] == "file":
            assert stat.S_ISREG(info.st_mode) and info.st_size == item["size"], item["path"]
            assert _sha256(path) == item["sha256"], item["path"]
        elif item["type"] == "symlink":
            assert stat.S_ISLNK(info.st_mode) and os.readlink(path) == item["target"]
            assert info.st_size == item["size"]
        else:
            assert stat.S_ISDIR(info.st_mode)
    for parent, names in children.items():
        assert set(os.listdir(root / parent)) == names, parent


def test_reference_repository_by_fqrn_from_configuration(
    mounter: Callable[..., MountHandle], reference_repo: Path, tmp_path: Path
) -> None:
    server = RepositoryServer(reference_repo / "cvmfs").start()
    try:
        config = tmp_path / "ref.conf"
        config.write_text(
            f"CVMFS_SERVER_URL={server.url}/cvmfs/@fqrn@\nCVMFS_HTTP_PROXY=DIRECT\n"
            f"CVMFS_KEYS_DIR={reference_repo / 'keys'}\n"
        )
        handle = mounter(REF, config_files=[config])
        assert handle.mounted
        _check_reference_tree(handle.mountpoint, reference_repo)
        first = os.stat(handle.mountpoint / "hello.txt")
        assert first.st_mtime_ns == os.stat(handle.mountpoint / "hello.txt").st_mtime_ns
        assert server.requests > 0
    finally:
        server.stop()


def _open_with(path: Path, mode: str) -> None:
    with open(path, mode) as handle:
        if "r" in mode:
            handle.read(1)


def test_errors_map_to_errno_and_xattrs(
    mounter: Callable[..., MountHandle], reference_repo: Path
) -> None:
    handle = mounter(reference_repo / "cvmfs" / REF,
                     public_key=reference_repo / "keys" / f"{REF}.pub")  # fmt: skip
    root = handle.mountpoint
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: os.stat(root / "missing"), errno.ENOENT),
        (lambda: os.listdir(root / "hello.txt"), errno.ENOTDIR),
        (lambda: os.stat(root / "hello.txt" / "below"), errno.ENOTDIR),
        (lambda: _open_with(root / "nested", "rb"), errno.EISDIR),
        (lambda: _open_with(root / "hello.txt", "r+b"), errno.EROFS),
        (lambda: _open_with(root / "new.txt", "wb"), errno.EROFS),
        (lambda: os.mkdir(root / "newdir"), errno.EROFS),
        (lambda: os.unlink(root / "hello.txt"), errno.EROFS),
        (lambda: os.setxattr(root / "hello.txt", "user.x", b"1"), errno.EROFS),
        (lambda: os.getxattr(root / "hello.txt", "user.nope"), errno.ENODATA),
    ]
    for call, code in cases:
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == code, (call, caught.value)
    big = root / "big" / "random-24MiB.bin"
    assert os.getxattr(root, "user.fqrn") == REF.encode()
    assert os.getxattr(big, "user.revision") == b"3"
    assert os.getxattr(big, "user.chunks") == b"26"
    assert len(os.getxattr(big, "user.chunk_list").splitlines()) == 26
    assert os.getxattr(big, "user.compression") == b"zlib"
    assert os.getxattr(root / "hello.txt", "user.hash").decode() == (
        "ce74758429e95753f62030056cb58477ba7f20d8"
    )
    names = set(os.listxattr(big))
    assert {"user.fqrn", "user.revision", "user.chunks", "user.chunk_list"} <= names
    assert "user.hash" not in names  # chunked: no whole-file hash
    assert "user.hash" in os.listxattr(root / "hello.txt")
    # (the kernel refuses user.* xattrs on symlinks, so user.rawlink is not reachable there)
    assert os.statvfs(root).f_namemax == 255


def test_corrupt_object_reads_as_eio(
    mounter: Callable[..., MountHandle], reference_repo: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy" / REF  # the folder name is the repository name
    shutil.copytree(reference_repo / "cvmfs" / REF, copy)
    from cvmfs_ml.client.repository import Repository

    with Repository.open(copy, public_key=reference_repo / "keys" / f"{REF}.pub") as repo:
        piece = repo.layout("/big/random-24MiB.bin").pieces[3]
    damaged = copy / "data" / piece.digest.hex[:2] / (piece.digest.hex[2:] + "P")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    handle = mounter(copy, public_key=reference_repo / "keys" / f"{REF}.pub")
    with open(handle.mountpoint / "big" / "random-24MiB.bin", "rb") as broken:
        assert len(broken.read(1000)) == 1000  # piece 0 is fine
        broken.seek(piece.offset + 10)
        with pytest.raises(OSError) as caught:
            broken.read(1000)
    assert caught.value.errno == errno.EIO
    assert (handle.mountpoint / "hello.txt").read_bytes().startswith(b"Hello")


# -- a repository we publish, over HTTP, read by onnxruntime ------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(repository folder, master public key, source tree) with an ONNX model and more."""
    from cvmfs_ml.bench.generators import make_llm_onnx

    base = tmp_path_factory.mktemp("published")
    tree = base / "tree"
    model_dir = tree / "models" / "demo" / "llm" / "1"
    make_llm_onnx(model_dir, total_bytes=8 * 2**20, dtype="float32")
    rng = np.random.default_rng(7)
    (tree / "data").mkdir()
    (tree / "data" / "random.bin").write_bytes(rng.integers(0, 256, 5_000_003, np.uint8).tobytes())
    (tree / "data" / "text.txt").write_text("model card\n" * 1000)
    (tree / "data" / "empty").write_bytes(b"")
    os.symlink("1", tree / "models" / "demo" / "llm" / "latest")
    settings = PublishSettings(
        compression=Compression.AUTO, min_chunk_size=256 * 1024, avg_chunk_size=512 * 1024,
        max_chunk_size=1024 * 1024, workers=2,
    )  # fmt: skip
    publisher = create_repository(base / "srv", "models.test", settings=settings)
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.commit()
    return publisher.repo_dir, publisher.keys.paths.master_public, tree


def _run_model(folder: Path) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    feed = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in spec.shape]
        feed[spec.name] = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return session.run(None, feed)[0]


def test_published_repository_over_http_with_onnxruntime(
    mounter: Callable[..., MountHandle], published: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    repo_dir, key, tree = published
    server = RepositoryServer(repo_dir.parent).start()
    trace, trace_again = tmp_path / "trace.jsonl", tmp_path / "trace-again.jsonl"
    cache = tmp_path / "shared-cache"
    try:
        handle = mounter(f"{server.url}/cvmfs/models.test", public_key=key, trace=trace,
                         cache=cache)  # fmt: skip
        root = handle.mountpoint
        originals = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
        assert len(originals) >= 5
        for original in originals:
            mounted = root / original.relative_to(tree)
            assert _sha256(mounted) == _sha256(original), original
            assert os.stat(mounted).st_size == original.stat().st_size
        assert os.readlink(root / "models/demo/llm/latest") == "1"

        # any program: cat and cp read the mount like a local folder
        cat = subprocess.run(["cat", str(root / "data/random.bin")], capture_output=True,
                             check=True, timeout=60)  # fmt: skip
        assert cat.stdout == (tree / "data/random.bin").read_bytes()
        subprocess.run(["cp", "-r", str(root / "models"), str(tmp_path / "copy")], check=True,
                       timeout=60)  # fmt: skip
        copied = tmp_path / "copy" / "demo" / "llm" / "1" / "model.onnx.data"
        assert _sha256(copied) == _sha256(tree / "models/demo/llm/1/model.onnx.data")

        local = _run_model(tree / "models/demo/llm/1")
        through_mount = _run_model(root / "models/demo/llm/latest")
        assert through_mount.shape == local.shape and np.array_equal(through_mount, local)

        sizes = json.loads(os.getxattr(root, "user.cvmfs_ml.read_sizes"))["sizes"]
        if os.geteuid() == 0:  # read_ahead_kb raised to 1024: the kernel asks for 1 MiB
            assert max(int(s) for s in sizes) == 1 << 20
        handle.unmount()

        # A second mount on the same cache (a new job on the node): every piece is a hit.
        # (Within one mount, whether a read finds its piece already prefetched is timing.)
        again = mounter(f"{server.url}/cvmfs/models.test", public_key=key, trace=trace_again,
                        cache=cache)  # fmt: skip
        data_path = again.mountpoint / "models/demo/llm/1/model.onnx.data"
        assert _sha256(data_path) == _sha256(tree / "models/demo/llm/1/model.onnx.data")
        again.unmount()
    finally:
        server.stop()
    records = load_trace(trace)
    data_reads = [r for r in records if r.path.endswith("model.onnx.data") and r.is_read]
    assert data_reads and "fetch" in {r.source for r in data_reads}
    summary = summarise_trace(records)
    assert summary["total"]["net_bytes"] > 0
    data_file = summary["files"]["/models/demo/llm/1/model.onnx.data"]
    assert data_file["fraction_of_file"] == 1.0
    warm_reads = [r for r in load_trace(trace_again) if r.is_read]
    assert warm_reads and {r.source for r in warm_reads} == {"hit"}
    assert sum(r.net_bytes for r in warm_reads) == 0


def test_cli_mount_detached_warm_and_umount(
    published: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from cvmfs_ml.cli.client import register_client_commands

    repo_dir, key, tree = published
    app = typer.Typer()
    register_client_commands(app)
    point = tmp_path / "mnt"
    point.mkdir()
    runner = CliRunner()
    result = runner.invoke(app, ["mount", str(repo_dir), str(point), "--key", str(key),
                                 "--cache", str(tmp_path / "cache"), "-d"])  # fmt: skip
    try:
        assert result.exit_code == 0, result.output
        assert is_mounted(point) and "mounted" in result.output
        pid = int(result.output.rsplit("pid ", 1)[1].split(")")[0])
        warm = runner.invoke(app, ["warm", str(point / "models/demo/llm/1"), "--json"])
        assert warm.exit_code == 0, warm.output
        report = json.loads(warm.output)
        assert report["how"] == "daemon" and report["files"] == 2
        model_files = (tree / "models/demo/llm/1").iterdir()
        assert report["bytes"] == sum(p.stat().st_size for p in model_files)
        again = json.loads(runner.invoke(app, ["warm", str(point / "models"), "--json"]).output)
        assert again["fetched_pieces"] == 0  # everything is in the cache now
        done = runner.invoke(app, ["umount", str(point)])
        assert done.exit_code == 0, done.output
        assert not is_mounted(point)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):  # our child here: reap it
            assert time.monotonic() < deadline, "the daemon did not exit after umount"
            time.sleep(0.05)
        again_umount = runner.invoke(app, ["umount", str(point)])
        assert again_umount.exit_code == 1
    finally:
        if is_mounted(point):
            unmount(point, lazy=True)


def test_failed_mount_reports_the_reason(
    published: tuple[Path, Path, Path], reference_repo: Path, tmp_path: Path
) -> None:
    repo_dir, _key, _tree = published
    point = tmp_path / "mnt"
    point.mkdir()
    with pytest.raises(CvmfsMlError, match=r"[Ss]ignature|whitelist"):
        mount(repo_dir, point, public_key=reference_repo / "keys" / f"{REF}.pub",
              cache=tmp_path / "cache", timeout=30)  # fmt: skip
    assert not is_mounted(point)
    with pytest.raises(CvmfsMlError, match="not a directory"):
        mount(repo_dir, tmp_path / "nowhere", cache=tmp_path / "cache", timeout=30)


# -- a Stratum 0 in S3 ----------------------------------------------------------------------------
def test_mount_reads_an_s3_stratum0_from_the_bucket_url(
    mounter: Callable[..., MountHandle], moto_s3: object, tmp_path: Path
) -> None:
    """``repo create s3://...``: the mount reads the bucket's plain HTTP URL, no credentials."""
    moto = moto_s3
    bucket = f"fuse-{os.getpid()}"
    moto.create_bucket(bucket)  # type: ignore[attr-defined]
    params = {**moto.s3_params(bucket), "CVMFS_SPOOL_DIR": str(tmp_path / "spool")}  # type: ignore[attr-defined]
    publisher = create_repository(
        f"s3://{bucket}/srv", "s3fuse.test", keys_dir=tmp_path / "keys", s3_config=params
    )
    src = tmp_path / "src"
    (src / "m").mkdir(parents=True)
    payload = np.random.default_rng(5).bytes(9 * 2**20 + 3)  # chunked with the defaults
    (src / "m" / "weights.bin").write_bytes(payload)
    (src / "m" / "config.json").write_text('{"a": 1}\n')
    os.symlink("weights.bin", src / "m" / "current")
    with publisher.transaction() as txn:
        txn.add_folder(src)
        txn.commit()
    url = f"{moto.url}/{bucket}/srv/s3fuse.test"  # type: ignore[attr-defined]
    handle = mounter(url, public_key=tmp_path / "keys" / "s3fuse.test.pub")
    root = handle.mountpoint
    assert _sha256(root / "m" / "weights.bin") == hashlib.sha256(payload).hexdigest()
    assert (root / "m" / "config.json").read_text() == '{"a": 1}\n'
    assert os.readlink(root / "m" / "current") == "weights.bin"
