"""The chunk-size/compression sweep on a tiny model, and the ``bench`` CLI helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvmfs_ml.bench.residency import resident_fraction
from cvmfs_ml.bench.sweep import SweepPoint, parse_points, run_sweep
from cvmfs_ml.bench.zoo import ModelSpec, build_model
from cvmfs_ml.cli.bench import bench_app
from cvmfs_ml.errors import ConfigError

_MiB = 2**20


def test_parse_points() -> None:
    points = parse_points("4/8/16, off", "zlib,none")
    assert points == [SweepPoint((4 * _MiB, 8 * _MiB, 16 * _MiB), "zlib"),
                      SweepPoint((4 * _MiB, 8 * _MiB, 16 * _MiB), "none"),
                      SweepPoint(None, "zlib"), SweepPoint(None, "none")]
    assert points[0].label == "4/8/16-zlib" and points[2].label == "whole-zlib"
    with pytest.raises(ConfigError):
        parse_points("4/8", "none")
    with pytest.raises(ConfigError):
        parse_points("", "none")


def test_sweep_small_chunks_dedup_a_fine_tune(tmp_path: Path) -> None:
    spec = ModelSpec("llm-6m", "llm", size=6 * _MiB, dtype="float32")
    points = parse_points("0.25/0.5/1,off", "none")
    doc = run_sweep(spec, points, tmp_path / "out", workdir=tmp_path / "work",
                    fine_tune_fraction=0.1, load_mode="fsspec", log=lambda _m: None)
    small, whole = doc["points"]
    assert small["point"] == "0.25/0.5/1-none" and whole["point"] == "whole-none"
    for row in doc["points"]:
        assert row["errors"] == [] and row["cold_load_s"] > 0 and row["publish_s"] > 0
        assert row["repo_bytes"] >= 0.99 * row["model_bytes"]  # "none": stored as is
    assert whole["dedup_saving"] < 0.05  # every file changed: nothing to share
    assert small["dedup_saving"] > 0.3  # small chunks keep the untouched tensors
    assert 0.05 < doc["fine_tune"]["changed_fraction"] < 0.5
    for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not (tmp_path / "work" / "sweep" / "whole-none").exists()  # cleaned up


def test_cli_drop_caches(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "00").mkdir(parents=True)
    (cache / "00" / "object").write_bytes(b"x" * 10000)
    model = build_model(ModelSpec("mlp", "mlp"), tmp_path / "models")
    onnx = model.files.folder / "model.onnx"
    onnx.read_bytes()
    result = CliRunner().invoke(bench_app, ["drop-caches", "--cache", str(cache), "--path",
                                            str(model.files.folder), "--no-global", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["bytes_freed"] == 10000 and data["global_drop"] is False
    assert data["files_evicted"] >= 1
    assert list(cache.iterdir()) == [] and cache.is_dir()
    assert resident_fraction(onnx) < 0.05
    kept = CliRunner().invoke(bench_app, ["drop-caches", "--cache", str(tmp_path / "models"),
                                          "--no-wipe", "--no-global"])
    assert kept.exit_code == 0 and onnx.exists() and "page cache" in kept.output


def test_cli_run_rejects_unknown_choices(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(bench_app, ["run", "--profile", "huge", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "unknown profile" in bad.output
    bad = runner.invoke(bench_app, ["run", "--models", "gpt-9", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "unknown models" in bad.output
    bad = runner.invoke(bench_app, ["run", "--repeats", "0", "--out", str(tmp_path)])
    assert bad.exit_code == 1
