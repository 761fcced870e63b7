"""The publish benchmark at a tiny scale: rounds, references, upstream detection, the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.bench.publish_report import format_report
from cvmfs_ml.bench.publishbench import PublishOptions, run_publish_bench, upstream_status

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("publish-bench")
    options = PublishOptions(scale=0.002, rounds=2, modes=("none", "isal", "none+buffered"),
                             cache_dir=base / "cache", work_dir=base / "work")
    return run_publish_bench(options, log=lambda line: None)


def test_rounds_measure_both_sides_of_each_ratio(report: dict) -> None:
    total = report["content"]["bytes"]
    assert total > 5 * 2**20 and report["content"]["files"] >= 2
    for ref in ("cp_r_sync", "read", "sha1_warm"):
        assert len(report["references"][ref]["runs"]) == 2
    for mode in ("none", "isal", "none+buffered"):
        runs = report["publish"][mode]
        assert len(runs["runs"]) == 2 and runs["min_s"] <= runs["median_s"] <= runs["max_s"]
        for detail in runs["details"]:
            assert detail["bytes_in"] == total
            assert detail["resident_before"] < 0.05  # the input was cold
            assert 0 < detail["peak_rss"] < 2**30
            assert {"read", "chunk", "hash", "write", "fsync"} <= set(detail["stages"])
        again = runs["details"][-1]["republish_unchanged"]
        assert again["objects_new"] == 0 and again["files_unchanged"] == report["content"]["files"]
    stored = report["publish"]["isal"]["details"][0]["stages"]
    assert "compress" in stored and "compress" not in report["publish"]["none"]["details"][0][
        "stages"]


def test_buffered_modes_publish_through_the_page_cache(tmp_path: Path) -> None:
    """``+buffered`` is ``CVMFS_ML_DIRECT_WRITES=false`` with the same compression."""
    from cvmfs_ml.bench.publishbench import FQRN, fresh_repository
    from cvmfs_ml.publish.settings import load_settings

    for mode, direct, compression in (("none", True, "none"), ("auto+buffered", False, "auto")):
        fresh_repository(tmp_path, mode)
        settings = load_settings(tmp_path / mode / "keys", FQRN)
        assert settings.direct_writes is direct
        assert settings.compression.value == compression


def test_upstream_is_detected_and_its_absence_said() -> None:
    reason = upstream_status(None)
    if shutil.which("cvmfs_server") is None:
        assert reason is not None and "not installed" in reason
    else:
        assert reason is not None and "--upstream-fqrn" in reason


def test_report_prints_ratios_spread_and_stages(report: dict) -> None:
    text = format_report(report)
    assert "cp -r + sync" in text and "x cp+sync" in text
    assert "publish none" in text and "publish isal" in text and "none+buffered" in text
    assert "stages of a 'none' publish" in text and "CPU s/GB" in text
    if report["upstream"]["unavailable"]:
        assert report["upstream"]["unavailable"] in text


def test_script_reprints_a_saved_run(report: dict, tmp_path: Path) -> None:
    saved = tmp_path / "publish.json"
    saved.write_text(json.dumps(report))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_publish.py"),
                          "--show", str(saved)], capture_output=True, text=True, timeout=120,
                         check=True)
    assert "publish none" in out.stdout and "cp -r + sync" in out.stdout
