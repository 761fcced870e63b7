"""``bench compare``: regressions beyond the threshold fail, noise and improvements do not."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cvmfs_ml.bench.compare import compare_files, compare_results
from cvmfs_ml.bench.report import SCHEMA, summarise
from cvmfs_ml.cli.bench import bench_app
from cvmfs_ml.errors import FormatError


def _row(mode: str, state: str, t: float, repeat: int = 0, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "runtime": "onnxruntime", "mode": mode, "network": "loopback",
            "cache_state": state, "repeat": repeat, "ok": True, "first_inference_s": t,
            "open_s": t * 0.9, "peak_rss_bytes": 200 * 2**20, "output_sha256": "ab",
            "origin_bytes": 0, **extra}


def _doc(fuse_cold: float = 2.0, tokens: float | None = None) -> dict[str, Any]:
    rows = []
    for r in range(3):
        rows += [_row("local", "cold", 1.0 + r * 0.01, r),
                 _row("fuse", "cold", fuse_cold + r * 0.01, r, tokens_per_s=tokens)]
    return {"schema": SCHEMA, "measurements": rows, "summary": summarise(rows)}


def test_identical_runs_pass() -> None:
    report = compare_results(_doc(), _doc())
    assert report.ok and not report.regressions and not report.improvements
    assert len(report.deltas) >= 4  # two scenarios, several metrics each


def test_slowdown_beyond_threshold_is_a_regression() -> None:
    report = compare_results(_doc(2.0), _doc(3.0), threshold=0.25)
    assert not report.ok
    flagged = {(d.scenario[2], d.metric) for d in report.regressions}
    assert ("fuse", "first_inference_s") in flagged
    assert all(d.scenario[2] == "fuse" for d in report.regressions)
    assert "REGRESSION" in report.format()


def test_change_within_threshold_or_floor_is_noise() -> None:
    assert compare_results(_doc(2.0), _doc(2.4), threshold=0.25).ok  # +20%
    tiny_base = _doc(0.004)
    tiny_new = _doc(0.008)  # +100% but only 4 ms: below the 10 ms floor
    report = compare_results(tiny_base, tiny_new, threshold=0.25)
    assert not any(d.metric == "first_inference_s" for d in report.regressions)


def test_faster_is_an_improvement_and_higher_is_better_for_tokens() -> None:
    report = compare_results(_doc(3.0, tokens=100.0), _doc(2.0, tokens=50.0))
    assert any(d.metric == "first_inference_s" for d in report.improvements)
    assert [d.metric for d in report.regressions] == ["tokens_per_s"]


def test_missing_added_and_failed_scenarios() -> None:
    base = _doc()
    new = copy.deepcopy(base)
    new["measurements"] = [dict(r, ok=False) if r["mode"] == "fuse" else r
                           for r in new["measurements"]]
    new["measurements"].append(_row("fsspec", "cold", 1.5))
    new["summary"] = summarise(new["measurements"])
    report = compare_results(base, new)
    assert not report.ok
    assert [k[2] for k in report.failures] == ["fuse"]
    assert [k[2] for k in report.added] == ["fsspec"]
    del new["summary"]  # summaries are recomputed from measurements when absent
    new["measurements"] = [r for r in new["measurements"] if r["mode"] == "local"]
    assert [k[2] for k in compare_results(base, new).missing] == ["fuse"]


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        compare_results({"nothing": 1}, _doc())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError):
        compare_files(bad, bad)
    with pytest.raises(ValueError):
        compare_results(_doc(), _doc(), threshold=-1)


def _shapes() -> list[Any]:
    """Results documents of the wrong shape, each of which raised TypeError or AttributeError
    inside compare or export before (found by mutating a real results.json)."""
    good = _doc()
    odd: list[Any] = [[], None, "x", {"measurements": 5}, {"summary": [None]}]
    for section, field, value in (("summary", "mode", {}), ("summary", "network", ["a"]),
                                  ("measurements", "model", [1]), ("summary", "cache_state", {})):
        doc = copy.deepcopy(good)
        doc[section][0][field] = value
        odd.append(doc)
    odd.append({**copy.deepcopy(good), "versions": 1e300})
    return odd


@pytest.mark.parametrize("doc", _shapes())
def test_results_of_the_wrong_shape_are_a_format_error(tmp_path: Path, doc: Any) -> None:
    from cvmfs_ml.bench.export import cvmfs_ci_rows
    from cvmfs_ml.bench.report import check_results

    with pytest.raises(FormatError):
        compare_results(_doc(), doc)
    with pytest.raises(FormatError):
        cvmfs_ci_rows(check_results(doc))
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(doc))
    runner = CliRunner()
    for args in (["compare", str(path), str(path)], ["export", str(path), "--format", "cvmfs-ci"]):
        done = runner.invoke(bench_app, args)
        assert done.exit_code in (1, 2), (args, done.output)
        assert done.exception is None or isinstance(done.exception, SystemExit), done.exception


def test_cli_exit_codes(tmp_path: Path) -> None:
    base, slow = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps(_doc(2.0)))
    slow.write_text(json.dumps(_doc(4.0)))
    runner = CliRunner()
    same = runner.invoke(bench_app, ["compare", str(base), str(base)])
    assert same.exit_code == 0, same.output
    worse = runner.invoke(bench_app, ["compare", str(base), str(slow)])
    assert worse.exit_code == 1 and "REGRESSION" in worse.output
    as_json = runner.invoke(bench_app, ["compare", str(base), str(slow), "--json",
                                        "--metric", "open_s"])
    assert as_json.exit_code == 1
    data = json.loads(as_json.output)
    assert not data["ok"] and {d["metric"] for d in data["regressions"]} == {"open_s"}
    loose = runner.invoke(bench_app, ["compare", str(base), str(slow), "--threshold", "2"])
    assert loose.exit_code == 0
    unknown = runner.invoke(bench_app, ["compare", str(base), str(slow), "--metric", "nope"])
    assert unknown.exit_code == 2
    missing = runner.invoke(bench_app, ["compare", str(base), str(tmp_path / "absent.json")])
    assert missing.exit_code == 1
