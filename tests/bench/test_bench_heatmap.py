"""Access heatmaps, residency strips and the access-trace summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.bench.heatmap import plot_heatmap, plot_residency, summarise_accesses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TRACE = {
    "a.onnx.data": [(0, 10), (10, 10), (50, 10), (60, 5), (0, 10)],
    "b.safetensors": [(100, 4), (0, 100)],
}
SIZES = {"a.onnx.data": 100, "b.safetensors": 200}


def test_summary_numbers() -> None:
    summary = summarise_accesses(TRACE, SIZES)
    a = summary["files"]["a.onnx.data"]
    assert a["read_count"] == 5
    assert a["bytes_read"] == 45
    assert a["unique_bytes"] == 35  # [0, 20) and [50, 65)
    assert a["fraction_of_file"] == pytest.approx(0.35)
    assert a["amplification"] == pytest.approx(45 / 35)
    assert a["sequential_fraction"] == pytest.approx(3 / 5)  # (0,10), (10,10), (60,5)
    assert a["median_read_size"] == 10
    b = summary["files"]["b.safetensors"]
    assert b["unique_bytes"] == 104 and b["sequential_fraction"] == 0.0
    total = summary["total"]
    assert total["read_count"] == 7 and total["bytes_read"] == 149
    assert total["unique_bytes"] == 139 and total["file_size"] == 300
    assert total["sequential_fraction"] == pytest.approx(3 / 7)
    assert total["median_read_size"] == 10


def test_summary_of_empty_trace() -> None:
    summary = summarise_accesses({"x": []}, {"x": 10})
    assert summary["files"]["x"]["read_count"] == 0
    assert summary["total"]["sequential_fraction"] is None


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_heatmap_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    size = 64 << 20
    scan = [(i << 20, 1 << 20) for i in range(64)]
    faults = [(int(o), 128 << 10) for o in rng.integers(0, size - (128 << 10), 300)]
    out = plot_heatmap({"scan": scan, "mmap": faults, "unread": []},
                       {"scan": size, "mmap": size, "unread": 10}, tmp_path / "h.png",
                       "synthetic trace")
    _assert_png(out)
    timed = plot_heatmap({"f": [(0, 10, 0.0), (10, 10, 0.5), (90, 10, 2.0)]}, {"f": 100},
                         tmp_path / "sub" / "t.png", "timed")
    _assert_png(timed)


def test_residency_png(tmp_path: Path) -> None:
    maps = {"half": np.arange(1000) < 500, "none": np.zeros(7, bool), "empty": np.zeros(0, bool)}
    _assert_png(plot_residency(maps, tmp_path / "r.png"))
