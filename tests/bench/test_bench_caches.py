"""Page-cache residency (mincore) and the cache-dropping helpers used before cold runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.bench.caches import drop_page_cache, wipe_cvmfs_ml_cache, wipe_upstream_cache
from cvmfs_ml.bench.residency import PAGE_SIZE, residency_map, residency_maps, resident_fraction
from cvmfs_ml.errors import CvmfsMlError


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED can evict them
    return path


def test_map_has_one_entry_per_page(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", 5 * PAGE_SIZE + 1)
    m = residency_map(path)
    assert m.dtype == np.bool_ and m.shape == (6,)
    empty = tmp_path / "empty"
    empty.touch()
    assert residency_map(empty).shape == (0,)
    assert resident_fraction(empty) == 1.0


def test_written_then_dropped_then_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.bin", 4 << 20)
    assert resident_fraction(path) > 0.9  # just written: in the page cache
    result = drop_page_cache(path)
    assert result.files == 1 and result.failed == 0 and not result.global_dropped
    assert resident_fraction(path) < 0.1
    with open(path, "rb") as f:  # read exactly the second MiB
        f.seek(1 << 20)
        f.read(1 << 20)
    m = residency_map(path)
    pages_per_mib = (1 << 20) // PAGE_SIZE
    assert m[pages_per_mib: 2 * pages_per_mib].all()
    assert m.mean() < 0.9  # the rest is still cold (readahead may add a little)
    with open(path, "rb") as f:
        f.read()
    assert resident_fraction(path) == 1.0


def test_drop_is_recursive_for_folders(tmp_path: Path) -> None:
    files = [_write(tmp_path / "m" / name, 1 << 20) for name in ("a", "sub/b", "sub/deep/c")]
    result = drop_page_cache(tmp_path / "m")
    assert result.files == 3
    maps = residency_maps({p.name: p for p in files})
    assert set(maps) == {"a", "b", "c"}
    assert all(m.mean() < 0.1 for m in maps.values())
    assert drop_page_cache([tmp_path / "missing"]).files == 0


def test_wipe_cvmfs_ml_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _write(cache / "ab" / "cdef", 1000)
    _write(cache / "cd" / "x" / "y", 500)
    _write(cache / "top", 24)
    assert wipe_cvmfs_ml_cache(cache) == 1524
    assert cache.is_dir() and not any(cache.iterdir())
    assert wipe_cvmfs_ml_cache(tmp_path / "absent") == 0
    with pytest.raises(CvmfsMlError):
        wipe_cvmfs_ml_cache("/")
    with pytest.raises(CvmfsMlError):
        wipe_cvmfs_ml_cache(Path.home())


def test_wipe_upstream_cache_without_cvmfs() -> None:
    if shutil.which("cvmfs_config"):
        pytest.skip("the upstream client is installed; wiping its cache is not a unit test")
    assert wipe_upstream_cache() is False
