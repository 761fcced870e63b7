"""Aggregation and report files: medians and spread, ratios to local, CSV/JSON/Markdown/PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.bench.report import (
    MEASUREMENT_FIELDS,
    SCHEMA,
    machine_info,
    summarise,
    versions,
    write_report,
)


def _row(mode: str, state: str, t: float, repeat: int, digest: str = "d1",
         **extra: Any) -> dict[str, Any]:
    return {"model": "llm", "runtime": "onnxruntime", "mode": mode, "network": "loopback",
            "cache_state": state, "repeat": repeat, "ok": True, "first_inference_s": t,
            "open_s": t / 2, "latency_p50_s": 0.01, "latency_p95_s": 0.02,
            "peak_rss_bytes": 100 * 2**20, "output_sha256": digest, "model_bytes": 2**24,
            "origin_bytes": 0 if mode == "local" else 2**24, **extra}


MEASUREMENTS = [
    _row("local", "cold", 1.0, 0), _row("local", "cold", 3.0, 1), _row("local", "cold", 2.0, 2),
    _row("local", "hot", 0.5, 0), _row("local", "hot", 0.5, 1),
    _row("fuse", "cold", 4.0, 0), _row("fuse", "cold", 6.0, 1),
    _row("fuse", "cold", 100.0, 2, ok=False, error="boom"),
    _row("fuse", "warm", 3.0, 0, digest="other"),
    _row("fuse", "hot", 1.0, 0),
]


def _by(summary: list[dict[str, Any]], mode: str, state: str) -> dict[str, Any]:
    return next(s for s in summary if s["mode"] == mode and s["cache_state"] == state)


def test_summary_medians_spread_and_failures() -> None:
    summary = summarise(MEASUREMENTS)
    assert len(summary) == 5
    local_cold = _by(summary, "local", "cold")
    assert local_cold["first_inference_s"] == 2.0
    assert (local_cold["first_inference_s_min"], local_cold["first_inference_s_max"]) == (1, 3)
    assert local_cold["n"] == 3 and local_cold["failed"] == 0
    fuse_cold = _by(summary, "fuse", "cold")
    assert fuse_cold["n"] == 2 and fuse_cold["failed"] == 1
    assert fuse_cold["first_inference_s"] == 5.0  # the failed run does not count
    assert fuse_cold["first_inference_s_max"] == 6.0


def test_ratio_to_local_uses_the_same_state_and_cold_for_warm() -> None:
    summary = summarise(MEASUREMENTS)
    assert _by(summary, "fuse", "cold")["ratio_to_local"] == pytest.approx(2.5)
    assert _by(summary, "fuse", "hot")["ratio_to_local"] == pytest.approx(2.0)
    assert _by(summary, "fuse", "warm")["ratio_to_local"] == pytest.approx(1.5)  # vs local cold
    assert _by(summary, "fuse", "cold")["outputs_match_local"] is True
    assert _by(summary, "fuse", "warm")["outputs_match_local"] is False


def test_summary_order_keeps_modes_as_run_and_states_cold_to_hot() -> None:
    order = [(s["mode"], s["cache_state"]) for s in summarise(MEASUREMENTS)]
    assert order == [("local", "cold"), ("local", "hot"), ("fuse", "cold"), ("fuse", "warm"),
                     ("fuse", "hot")]


def test_write_report_files(tmp_path: Path) -> None:
    doc: dict[str, Any] = {
        "schema": SCHEMA, "run_id": "x", "profile": "test", "machine": machine_info(),
        "settings": {"origin": "builtin", "drop_method": "fadvise"},
        "network": {"loopback": "no emulation"}, "measurements": MEASUREMENTS,
        "checks": {"outputs_identical": {"ok": False, "detail": "differ"}},
        "concurrency": [{"clients": 1, "model": "llm", "wall_s_median": 1.0, "wall_s_max": 1.0,
                         "origin_requests": 5, "origin_bytes": 2**24, "hit_ratio": 0.0},
                        {"clients": 4, "model": "llm", "wall_s_median": 2.0, "wall_s_max": 3.0,
                         "origin_requests": 5, "origin_bytes": 2**24, "hit_ratio": 0.75}],
    }
    paths = write_report(doc, tmp_path)
    assert set(paths) >= {"json", "csv", "summary_csv", "markdown", "plot_loopback",
                          "plot_concurrency"}
    for key in ("plot_loopback", "plot_concurrency"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == SCHEMA and len(data["summary"]) == 5
    assert sorted(data["plots"]) == ["concurrency.png", "load_time.png"]
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == MEASUREMENT_FIELDS
        assert len(list(reader)) == len(MEASUREMENTS)
    md = paths["markdown"].read_text()
    assert "## llm" in md and "| fuse | warm |" in md and "**FAIL** outputs_identical" in md
    assert "(1 failed)" in md and "0.75" in md


def test_versions_and_machine_are_recorded() -> None:
    v = versions()
    assert v["numpy"] and v["python"] and "nginx" in v
    m = machine_info()
    assert m["cpu_count"] and m["kernel"]


def test_plot_labels_are_phrases_with_units_not_json_keys() -> None:
    from cvmfs_ml.bench.report import METRIC_LABELS, SUMMARY_METRICS, metric_label

    for metric in SUMMARY_METRICS:
        label = metric_label(metric)
        assert "_" not in label, (metric, label)
        if metric in METRIC_LABELS and metric.endswith("_s") and "per_s" not in metric:
            assert label.endswith("(s)") and not label.startswith(metric)
    assert metric_label("first_inference_s") == "time to first inference (s)"
