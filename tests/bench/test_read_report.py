"""The read benchmark's report: goals, the worst run's ratio and the per-run breakdown."""

from __future__ import annotations

from typing import Any

from cvmfs_ml.bench.read_report import annotate, breakdown, table, upstream_note
from cvmfs_ml.bench.readbench import profile_delta


def _cell(mode: str, state: str, runs: list[float], details: list[dict[str, Any]],
          network: str = "loopback") -> dict[str, Any]:
    return {"network": network, "mode": mode, "state": state, "runs": runs,
            "median_s": sorted(runs)[len(runs) // 2], "min_s": min(runs), "max_s": max(runs),
            "peak_rss_bytes": 50 << 20 if mode != "local" else None, "details": details}


def _doc() -> dict[str, Any]:
    profile = {"loop_reads": 1000, "thread_reads": 24, "nowait_misses": 3,
               "loop_cpu_seconds": 0.5, "handler_seconds": 0.2, "pread_seconds": 0.19,
               "pread_bytes": 2**30, "lookup_count": 135, "lookup_seconds": 0.03,
               "crc_files": 0, "crc_seconds": 0.0, "advise_pieces": 135, "advise_seconds": 1.0}
    return {
        "weights_bytes": 2**30, "chunks": 135, "origin": "nginx",
        "upstream": upstream_note(),
        "cells": [
            _cell("local", "cold", [0.5, 0.6, 0.7],
                  [{"disk_mib": 1024, "disk_busy_s": 0.45}] * 3, network="-"),
            _cell("local", "hot", [0.1, 0.1, 0.1], [{}] * 3, network="-"),
            _cell("fuse", "warm", [0.6, 0.65, 0.9],
                  [{"daemon_cpu_s": 0.6, "disk_mib": 1024, "disk_busy_s": 0.5,
                    "read_profile": profile, "local_s": local} for local in (0.6, 0.6, 1.0)]),
            _cell("fuse", "hot", [0.11, 0.12, 0.13],
                  [{"read_profile": {}, "local_s": 0.1}] * 3),
        ],
    }


def test_goals_use_this_runs_baselines_and_the_worst_run_is_shown() -> None:
    doc = _doc()
    annotate(doc)
    warm = next(c for c in doc["cells"] if c["mode"] == "fuse" and c["state"] == "warm")
    assert warm["goal_s"] == 1.1 * 0.6  # 1.1 x local cold median
    assert warm["goal_met"] is True  # median 0.65 <= 0.66
    hot = next(c for c in doc["cells"] if c["mode"] == "fuse" and c["state"] == "hot")
    assert hot["goal_met"] is True  # 0.12 <= 1.2 x 0.1
    text = table(doc)
    warm_line = next(line for line in text.splitlines() if "fuse" in line and "warm" in line)
    assert "1.08x" in warm_line  # median / local cold
    assert "1.50x" in warm_line  # worst run 0.9 / 0.6: the goal is not met in every run
    assert "upstream cvmfs2" in text
    # paired with the local cat of the same round: 0.9 / 1.0 is the worst warm run
    assert warm["paired_worst"] == max(0.6 / 0.6, 0.65 / 0.6, 0.9 / 1.0)
    assert warm["goal_met_every_run"] is True  # 1.083 <= 1.1
    assert hot["goal_met_every_run"] is False  # 0.13 / 0.1 > 1.2
    assert "(local 1.00, 0.90x)" in text


def test_breakdown_lists_every_run_with_the_daemons_counters() -> None:
    lines = breakdown(_doc())
    text = "\n".join(lines)
    assert "Where the time goes" in lines[1]
    warm_runs = [line for line in lines if "loop CPU 0.50" in line]
    assert len(warm_runs) == 3
    assert "handler 0.20, reply 0.30" in warm_runs[0]
    assert "reads 1000/24 (nowait misses 3)" in warm_runs[0]
    assert "CRC 0/0.00" in warm_runs[0] and "disk 1024 MiB busy 0.50" in warm_runs[0]
    assert text.count("disk 1024 MiB busy 0.45") == 3  # local cold runs


def test_profile_delta_is_what_a_cell_added() -> None:
    before = {"loop_reads": 10, "loop_seconds": 0.5}
    after = {"loop_reads": 30, "loop_seconds": 0.75, "crc_files": 1}
    assert profile_delta(before, after) == {"loop_reads": 20, "loop_seconds": 0.25,
                                            "crc_files": 1}


def test_cold_rows_show_both_downloads_and_the_goal_stays_on_curl() -> None:
    doc = _doc()
    doc["cells"] += [
        _cell("curl", "cold", [1.0, 1.0, 1.0], [{}] * 3, network="rtt20"),
        _cell("download", "cold", [2.0, 2.0, 2.0], [{}] * 3, network="rtt20"),
        _cell("fuse", "cold", [3.0, 3.0, 3.0], [{}] * 3, network="rtt20"),
    ]
    annotate(doc)
    cold = next(c for c in doc["cells"] if c["mode"] == "fuse" and c["state"] == "cold")
    assert cold["goal_s"] == 1.5 * 1.0  # the goal is against curl to /dev/null
    assert cold["goal_met"] is False
    text = table(doc)
    line = next(x for x in text.splitlines() if x.startswith("rtt20") and "fuse" in x)
    assert "3.00x" in line and "1.50x" in line  # x curl, then x download into a file
    download = next(x for x in text.splitlines() if x.startswith("rtt20") and "download" in x)
    assert "1.50x" not in download  # a baseline row has no ratio to itself
