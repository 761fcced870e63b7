"""``cvmfs-ml bench compare BASELINE.json NEW.json``: flag regressions between two runs.

This is the hook for continuous benchmarking: a CI job keeps the ``results.json`` of a
reference run, runs the same profile on a new commit and fails when a scenario got worse by
more than a threshold. Scenarios are matched on :data:`~cvmfs_ml.bench.report.SCENARIO_KEY`;
each metric is compared on its median.

Benchmarks on shared machines are noisy (performance-notes.md: ±20% for warm reads, up to 2x
when the second vCPU is busy), so a change counts as a regression only when it is worse by
more than ``threshold`` (relative) *and* by more than the metric's absolute floor (a 40%
slower 2 ms load is 0.8 ms: noise, not a regression).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cvmfs_ml.bench.report import SCENARIO_KEY, check_results, load_results, summarise

__all__ = ["DEFAULT_METRICS", "CompareReport", "Delta", "compare_files", "compare_results"]

# metric -> (direction, absolute floor): "lower" means smaller is better
DEFAULT_METRICS: dict[str, tuple[str, float]] = {
    "first_inference_s": ("lower", 0.010),
    "open_s": ("lower", 0.010),
    "latency_p50_s": ("lower", 0.002),
    "latency_p95_s": ("lower", 0.005),
    "tokens_per_s": ("higher", 1.0),
    "peak_rss_bytes": ("lower", 32 * 2**20),
    "origin_bytes": ("lower", 2**20),
    "origin_requests": ("lower", 2.0),
}


@dataclass(frozen=True)
class Delta:
    """One metric of one scenario in both runs; ``change`` is new/baseline - 1."""

    scenario: tuple[Any, ...]
    metric: str
    baseline: float
    new: float
    change: float
    regression: bool
    improvement: bool

    def describe(self) -> str:
        key = "/".join(str(k) for k in self.scenario)
        return (f"{key} {self.metric}: {self.baseline:.6g} -> {self.new:.6g} "
                f"({self.change * 100:+.1f}%)")


@dataclass
class CompareReport:
    """All deltas plus the scenarios only one side has."""

    threshold: float
    deltas: list[Delta] = field(default_factory=list)
    missing: list[tuple[Any, ...]] = field(default_factory=list)  # in baseline only
    added: list[tuple[Any, ...]] = field(default_factory=list)  # in new only
    failures: list[tuple[Any, ...]] = field(default_factory=list)  # failed runs in new

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.regression]

    @property
    def improvements(self) -> list[Delta]:
        return [d for d in self.deltas if d.improvement]

    @property
    def ok(self) -> bool:
        """No regression and no scenario that failed in the new run but worked before."""
        return not self.regressions and not self.failures

    def format(self) -> str:
        lines = [f"{len(self.deltas)} comparisons, threshold {self.threshold * 100:.0f}%: "
                 f"{len(self.regressions)} regressions, {len(self.improvements)} improvements"]
        for d in self.regressions:
            lines.append(f"REGRESSION {d.describe()}")
        for key in self.failures:
            lines.append(f"FAILED     {'/'.join(map(str, key))} (worked in the baseline)")
        for d in self.improvements:
            lines.append(f"improved   {d.describe()}")
        for key in self.missing:
            lines.append(f"missing    {'/'.join(map(str, key))} (only in the baseline)")
        for key in self.added:
            lines.append(f"new        {'/'.join(map(str, key))} (only in the new run)")
        return "\n".join(lines)


def _summary(doc: Mapping[str, Any], what: str) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    rows = check_results(doc, what).get("summary")
    if rows is None:
        rows = summarise(doc["measurements"])
    return {tuple(r.get(k) for k in SCENARIO_KEY): r for r in rows}


def compare_results(baseline: Mapping[str, Any], new: Mapping[str, Any], *,
                    threshold: float = 0.25,
                    metrics: Mapping[str, tuple[str, float]] | None = None) -> CompareReport:
    """Compare the scenario medians of two result documents."""
    if not threshold >= 0:  # written so that NaN fails too
        raise ValueError("threshold must not be negative")
    metrics = DEFAULT_METRICS if metrics is None else metrics
    base = _summary(baseline, "baseline")
    cur = _summary(new, "new")
    report = CompareReport(threshold)
    report.missing = sorted((k for k in base if k not in cur), key=str)
    report.added = sorted((k for k in cur if k not in base), key=str)
    for key in sorted((k for k in base if k in cur), key=str):
        b, n = base[key], cur[key]
        if (n.get("n") or 0) == 0 and (b.get("n") or 0) > 0:
            report.failures.append(key)
            continue
        for metric, (direction, floor) in metrics.items():
            bv, nv = b.get(metric), n.get(metric)
            if not isinstance(bv, (int, float)) or not isinstance(nv, (int, float)) or bv <= 0:
                continue
            change = nv / bv - 1.0
            worse = change if direction == "lower" else -change
            big = abs(nv - bv) > floor
            report.deltas.append(Delta(key, metric, float(bv), float(nv), change,
                                       regression=worse > threshold and big,
                                       improvement=-worse > threshold and big))
    return report


def compare_files(baseline: str | os.PathLike[str], new: str | os.PathLike[str], *,
                  threshold: float = 0.25, metrics: Sequence[str] | None = None) -> CompareReport:
    """:func:`compare_results` on two ``results.json`` files (``metrics`` limits the metrics)."""
    chosen = None
    if metrics:
        unknown = [m for m in metrics if m not in DEFAULT_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(DEFAULT_METRICS)}")
        chosen = {m: DEFAULT_METRICS[m] for m in metrics}
    return compare_results(load_results(baseline), load_results(new), threshold=threshold,
                           metrics=chosen)  # fmt: skip
