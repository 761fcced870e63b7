"""fsspec reads stream: a 1 GiB model loads with peak RSS under 300 MB (issue 8, item 8).

A 1 GiB safetensors file is published (compression none, default chunk sizes) and served by
nginx; a fresh Python process loads it through ``cvmfs://`` tensor by tensor (the way a
loader that wants one layer at a time does), copies it to local disk with ``fs.get``, and
reports its peak RSS (``VmHWM``; ``ru_maxrss`` of a child also counts the parent's pages it
inherited before ``exec``). A whole-file ``read()`` of a smaller file must cost the
file once in memory, not twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.testing import Nginx

pytestmark = [pytest.mark.service, pytest.mark.slow]

FQRN = "memory.test"
TENSOR_BYTES = 16 * 2**20
TENSORS = 64  # 1 GiB of weights
RSS_LIMIT_MB = 300

LOADER = r"""
import hashlib, json, struct, sys
import numpy as np
import fsspec

def peak_mb():
    # VmHWM: this process's peak RSS. ru_maxrss would also count the forked parent's pages
    # before exec (Linux keeps the maximum across exec), i.e. the test runner's memory.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

url, key, cache, local, path, mode = sys.argv[1:7]
fs = fsspec.filesystem("cvmfs", server_url=url, public_key=key, cache_storage=cache)
digest = hashlib.sha256()
if mode == "tensors":
    with fs.open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        base = 8 + length
        sums = {}
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = spec["data_offsets"]
            tensor = np.empty(spec["shape"], dtype=np.float32)
            f.seek(base + start)
            assert f.readinto(memoryview(tensor).cast("B")) == end - start
            sums[name] = float(tensor.sum(dtype=np.float64))
            del tensor
    after_tensors = peak_mb()
    fs.get(path, local)
    with open(local, "rb") as copy:
        while block := copy.read(8 << 20):
            digest.update(block)
    print(json.dumps({"sums": sums, "sha256": digest.hexdigest(), "tensors_mb": after_tensors,
                      "rss_mb": peak_mb()}))
else:
    before = peak_mb()
    with fs.open(path, "rb") as f:
        data = f.read()
    digest.update(data)
    print(json.dumps({"sha256": digest.hexdigest(), "size": len(data), "before_mb": before,
                      "rss_mb": peak_mb()}))
"""


def _write_safetensors(path: Path, tensors: int, tensor_bytes: int) -> dict[str, float]:
    """A safetensors file of float32 tensors written piece by piece; returns their sums."""
    count = tensor_bytes // 4
    header = {
        f"layer{i}.weight": {
            "dtype": "F32",
            "shape": [count],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
        for i in range(tensors)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(11)
    sums = {}
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(tensors):
            tensor = rng.standard_normal(count, dtype=np.float32)
            sums[f"layer{i}.weight"] = float(tensor.sum(dtype=np.float64))
            out.write(tensor.tobytes())
    return sums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(served root, master key, source folder) with big.safetensors (1 GiB), small.bin."""
    base = tmp_path_factory.mktemp("memory")
    src = base / "model"
    src.mkdir()
    sums = _write_safetensors(src / "big.safetensors", TENSORS, TENSOR_BYTES)
    (src / "sums.json").write_text(json.dumps(sums))
    (src / "small.bin").write_bytes(np.random.default_rng(3).bytes(160 * 2**20))
    settings = PublishSettings(compression=Compression.NONE, workers=2)
    publisher = create_repository(base / "srv" / "cvmfs", FQRN, settings=settings)
    with publisher.transaction() as txn:
        txn.add_folder(src, "/m")
        txn.commit()
    return base / "srv", publisher.keys.paths.master_public, src


Published = tuple[Path, Path, Path]


def _load(
    published: Published, start: Callable[..., Nginx], tmp: Path, name: str, mode: str
) -> tuple[dict, Path]:
    """Run LOADER on ``/m/<name>`` in a fresh process; its JSON report and the source file."""
    root, key, src = published
    server = start(root)
    done = subprocess.run(
        [sys.executable, "-c", LOADER, server.repo_url(FQRN), str(key),
         str(tmp / "cache"), str(tmp / "copy"), f"{FQRN}/m/{name}", mode],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), src / name


def test_a_1gib_model_loads_with_bounded_memory(
    published: Published, nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    result, source = _load(published, nginx_factory, tmp_path, "big.safetensors", "tensors")
    assert result["sums"] == json.loads((source.parent / "sums.json").read_text())
    assert result["sha256"] == _sha256(source)
    assert result["rss_mb"] < RSS_LIMIT_MB, (result["tensors_mb"], result["rss_mb"])


def test_a_whole_file_read_holds_the_file_once(
    published: Published, nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    result, source = _load(published, nginx_factory, tmp_path, "small.bin", "whole")
    assert result["size"] == source.stat().st_size
    assert result["sha256"] == _sha256(source)
    # the file once (plus the interpreter and the client), not its pieces and their join
    size_mb = source.stat().st_size / 2**20
    assert result["rss_mb"] - result["before_mb"] < 1.3 * size_mb + 60, result
