"""Tables of the publish benchmark: ratios to ``cp -r`` + ``sync``, spread, stages per byte."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from cvmfs_ml.bench.publishbench import GOAL_RSS, GOAL_X_CP
from cvmfs_ml.publish.profile import STAGES

__all__ = ["format_report"]


def _spread(runs: list[float]) -> str:
    return f"{min(runs):.2f}-{max(runs):.2f}"


def _ratio_line(runs: list[float], base: list[float]) -> tuple[float, str]:
    """Median ratio of medians, and the per-round ratios (round i against round i)."""
    paired = [a / b for a, b in zip(runs, base, strict=False)]
    return statistics.median(runs) / statistics.median(base), " ".join(f"{r:.2f}" for r in paired)


def format_report(report: dict[str, Any]) -> str:
    lines: list[str] = []
    out: Callable[[str], None] = lines.append
    total = report["content"]["bytes"]
    gb = total / 1e9
    refs = report["references"]
    cp = refs["cp_r_sync"]
    machine = report["machine"]
    out(f"input: {gb:.2f} GB in {report['content']['files']} files (scale {report['scale']:g}), "
        f"{report['rounds']} rounds, cold inputs; {machine['cpus']} CPUs; load "
        f"{machine['probe_before']['loadavg']} before, {machine['probe_after']['loadavg']} after; "
        f"two-thread SHA-1 speedup {machine['probe_before']['two_thread_speedup']} before, "
        f"{machine['probe_after']['two_thread_speedup']} after (2.0 = both cores free)")
    upstream = report["upstream"]
    if upstream["unavailable"]:
        out(f"upstream: {upstream['unavailable']}")
    out("")
    head = (f"{'':<22} {'median s':>8} {'spread s':>11} {'MB/s':>6} {'x cp+sync':>9} "
            f"{'per round':>16} {'peak RSS':>9} {'CPU s/GB':>8}")
    out(head)
    out("-" * len(head))
    cp_cpu = [d["cpu"] for d in cp["details"] if "cpu" in d]
    cp_cpu_text = f"{statistics.median(cp_cpu) / gb:>8.2f}" if cp_cpu else f"{'-':>8}"
    out(f"{'cp -r + sync':<22} {cp['median_s']:>8.2f} {_spread(cp['runs']):>11} "
        f"{total / cp['median_s'] / 1e6:>6.0f} {1.0:>9.2f} {'':>16} {'':>9} {cp_cpu_text}")
    for name, key in (("read (local disk)", "read"), ("sha1, 1 thread, warm", "sha1_warm")):
        ref = refs[key]
        ratio, per_round = _ratio_line(ref["runs"], cp["runs"])
        out(f"{name:<22} {ref['median_s']:>8.2f} {_spread(ref['runs']):>11} "
            f"{total / ref['median_s'] / 1e6:>6.0f} {ratio:>9.2f} {per_round:>16}")
    if upstream.get("publish"):
        up = upstream["publish"]
        ratio, per_round = _ratio_line(up["runs"], cp["runs"])
        out(f"{'upstream publish':<22} {up['median_s']:>8.2f} {_spread(up['runs']):>11} "
            f"{total / up['median_s'] / 1e6:>6.0f} {ratio:>9.2f} {per_round:>16}")
    goals: list[str] = []
    for mode, runs in report["publish"].items():
        ratio, per_round = _ratio_line(runs["runs"], cp["runs"])
        rss = max(d["peak_rss"] for d in runs["details"])
        cpu = statistics.median(d["cpu_user"] + d["cpu_sys"] for d in runs["details"])
        out(f"{'publish ' + mode:<22} {runs['median_s']:>8.2f} {_spread(runs['runs']):>11} "
            f"{total / runs['median_s'] / 1e6:>6.0f} {ratio:>9.2f} {per_round:>16} "
            f"{rss / 2**20:>5.0f} MiB {cpu / gb:>8.2f}")
        rss_ok = "met" if rss < GOAL_RSS else "NOT met"
        text = f"  {mode}: peak RSS < {GOAL_RSS / 1e6:.0f} MB {rss_ok}"
        if mode.partition("+")[0] in ("none", "auto"):
            text += f"; x cp+sync <= {GOAL_X_CP}: {'met' if ratio <= GOAL_X_CP else 'NOT met'}"
        if upstream.get("publish"):
            text += f"; x upstream {runs['median_s'] / upstream['publish']['median_s']:.2f}"
        again = next((d["republish_unchanged"] for d in runs["details"]
                      if "republish_unchanged" in d), None)
        if again:
            text += (f"; re-publish unchanged {again['seconds']:.2f} s, "
                     f"{again['objects_new']} new objects")
        goals.append(text)
    out("x cp+sync: median time / median time of cp -r + sync; per round: the same within each "
        "round. Publish times include the publisher's own syncfs. CPU s/GB: the process's own "
        "(cp's excludes the kernel's writeback threads, and so does the publisher's, except the "
        "writeback it starts itself); on a busy machine it is the figure that carries over.")
    lines += goals
    for mode, runs in report["publish"].items():
        order = sorted(range(len(runs["runs"])), key=runs["runs"].__getitem__)
        lines += _stage_lines(mode, runs["details"][order[(len(order) - 1) // 2]])
    return "\n".join(lines)


def _stage_lines(mode: str, run: dict[str, Any]) -> list[str]:
    """Per-stage wall and CPU of one publish, per GB of input."""
    gb = run["bytes_in"] / 1e9
    cpu = run["cpu_user"] + run["cpu_sys"]
    lines = ["", f"stages of a '{mode}' publish ({run['seconds']:.2f} s wall, {cpu:.2f} CPU s "
             f"= {cpu / gb:.2f} CPU s/GB, {run['workers']} workers); wall is summed over "
             "threads, so stages running side by side add up to more than the publish"]
    lines.append(f"  {'stage':<13} {'wall s':>7} {'CPU s':>7} {'CPU s/GB':>8} {'calls':>6}  what")
    for name, t in run["stages"].items():
        lines.append(f"  {name:<13} {t['wall']:>7.2f} {t['cpu']:>7.2f} {t['cpu'] / gb:>8.2f} "
                     f"{t['calls']:>6}  {STAGES.get(name, '')}")
    measured = sum(t["cpu"] for t in run["stages"].values())
    lines.append(f"  {'other':<13} {'':>7} {cpu - measured:>7.2f} {(cpu - measured) / gb:>8.2f}"
                 f" {'':>6}  process CPU not in a stage (scan, imports, thread switches)")
    return lines
