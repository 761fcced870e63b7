"""Our results in the layout of CVMFS's continuous benchmarking.

Upstream's harness (``cvmfs/cvmfs``, ``test/performance-benchmark/client/``) runs workload
scripts from a ``/cvmfs`` mount in cold, warm and hot cache states and uploads one CSV row per
(command, build, client configuration, metric): the columns of :data:`CVMFS_CI_COLUMNS`, where
each cache state carries the minimum, first quartile, median, third quartile and maximum over
the repetitions. Its uploader splits ``build_name`` at the last ``-`` into version and commit
and strips the repository prefix (``sft.cern.ch_``) from ``metric``; the rows written here keep
to that, so our results can be fed to the same results server beside upstream's workloads.

Metrics that mean the same thing take the harness's names: ``/usr/bin/time``'s keys (``real``,
``nmax_resident_set_size_kb``, ``page_faults_major``) and, for the client's counters, the names
of ``cvmfs_talk internal affairs`` rows. Ours that have no counterpart keep a descriptive name.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cvmfs_ml.errors import FormatError

__all__ = ["CACHE_STATES", "CVMFS_CI_COLUMNS", "CVMFS_CI_METRICS", "INTERNAL_AFFAIRS",
           "cvmfs_ci_rows", "internal_affairs", "quartiles", "write_cvmfs_ci"]

CACHE_STATES = ("cold", "warm", "hot")
_STATS = ("min_val", "first_quartile", "median", "third_quartile", "max_val")

CVMFS_CI_COLUMNS = (
    "tag", "command_label", "build_name", "client_config", "threads", "run_id", "repetitions",
    "metric", *(f"{state}_cache_{stat}" for state in CACHE_STATES for stat in _STATS),
)
"""The harness's results columns, in its order."""

CVMFS_CI_METRICS: dict[str, tuple[str, Callable[[float], float]]] = {
    # /usr/bin/time's keys in the harness (benchmark_time.py dict_time_format)
    "wall_s": ("real", float),
    "peak_rss_bytes": ("nmax_resident_set_size_kb", lambda v: v / 1024),
    "major_faults": ("page_faults_major", float),
    # ours, without a counterpart
    "open_s": ("model_load_s", float),
    "first_inference_s": ("first_inference_s", float),
    "first_token_s": ("time_to_first_token_s", float),
    "latency_p50_s": ("inference_latency_p50_s", float),
    "tokens_per_s": ("tokens_per_s", float),
    "origin_requests": ("origin_requests", float),
    "origin_bytes": ("origin_bytes", float),
}
"""Our measurement field -> (harness metric name, conversion to the harness's unit)."""


def quartiles(values: Sequence[float]) -> tuple[float, float, float, float, float]:
    """Minimum, first quartile, median, third quartile and maximum (linear interpolation,
    as pandas' ``describe`` and numpy's default ``percentile`` compute them)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        only = ordered[0]
        return only, only, only, only, only
    q1, q2, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return ordered[0], q1, q2, q3, ordered[-1]


def cvmfs_ci_rows(doc: Mapping[str, Any], *, threads: int = 1) -> list[dict[str, Any]]:
    """One row per (model, runtime, mode, network, metric) of a ``results.json`` document.

    ``command_label`` names the workload (``cvmfs-ml-<model>``), ``client_config`` the storage
    mode and network (``fuse@loopback``); a cache state without successful measurements
    leaves its five cells empty, as the harness does for states it did not run.
    """
    measurements = doc.get("measurements")
    if not isinstance(measurements, list):
        raise FormatError("results.json", "no 'measurements' list: not a `bench run` result")
    versions = doc.get("versions") or {}
    build = f"{versions.get('cvmfs-ml') or '0'}-{doc.get('commit') or 'unknown'}"
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, list[float]]]] = {}
    for row in measurements:
        if not isinstance(row, Mapping) or not row.get("ok"):
            continue
        key = (str(row.get("model")), str(row.get("runtime")), str(row.get("mode")),
               str(row.get("network")))
        state = str(row.get("cache_state"))
        if state not in CACHE_STATES:
            continue
        per_metric = groups.setdefault(key, {})
        for field, (metric, convert) in CVMFS_CI_METRICS.items():
            value = row.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                per_metric.setdefault(metric, {}).setdefault(state, []).append(convert(value))
    rows: list[dict[str, Any]] = []
    for (model, _runtime, mode, network), per_metric in groups.items():
        for metric, per_state in per_metric.items():
            row: dict[str, Any] = {
                "tag": doc.get("started") or "",
                "command_label": f"cvmfs-ml-{model}",
                "build_name": build,
                "client_config": f"{mode}@{network}",
                "threads": threads,
                "run_id": doc.get("run_id") or "",
                "repetitions": max(len(v) for v in per_state.values()),
                "metric": metric,
            }
            for state in CACHE_STATES:
                values = per_state.get(state)
                stats = quartiles(values) if values else (None,) * len(_STATS)
                for stat, value in zip(_STATS, stats, strict=True):
                    row[f"{state}_cache_{stat}"] = value
            rows.append(row)
    return rows


def write_cvmfs_ci(rows: Iterable[Mapping[str, Any]], out: io.TextIOBase | Any) -> int:
    """Write ``rows`` as the harness's CSV (header first); returns the number of rows."""
    writer = csv.DictWriter(out, fieldnames=list(CVMFS_CI_COLUMNS), lineterminator="\n")
    writer.writeheader()
    count = 0
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CVMFS_CI_COLUMNS})
        count += 1
    return count


INTERNAL_AFFAIRS: tuple[tuple[str, tuple[str, str], str], ...] = (
    ("download.sz_transferred_bytes", ("fetch", "bytes"), "Dwldmgr: #Transferred bytes"),
    ("download.n_requests", ("fetch", "requests"), "Dwldmgr: #Requests"),
    ("download.n_retries", ("fetch", "retries"), "Dwldmgr: #Retries"),
    ("fetch.n_downloads", ("fetch", "objects"), "#Fetch Requests Resulting in Downloads"),
    ("cvmfs.n_fs_open", ("fuse", "opens"), "#Open calls (Fs)"),
    ("cvmfs.n_fs_dir_open", ("fuse", "dir_opens"), "#Opendir calls (Fs)"),
    ("cvmfs.n_io_error", ("fuse", "io_errors"), "#I/O errors (Fs)"),
)
"""Upstream ``internal affairs`` counters that mean what one of our mount's counters means:
(upstream name, (section, key) in ``cvmfs-ml stats --json``, upstream's description).
Counters without a twin are left out rather than approximated: upstream's
``fetch.n_invocations`` counts catalog fetches too, our cache hits and misses only data."""


def internal_affairs(stats: Mapping[str, Any]) -> str:
    """A mount's counters as ``cvmfs_talk internal affairs`` prints them: a ``Name|Value|
    Description`` header, then one row per counter, which the benchmark harness parses."""
    rows = ["Name|Value|Description"]
    for name, (section, key), description in INTERNAL_AFFAIRS:
        value = (stats.get(section) or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"{name}|{int(value)}|{description}")
    return "\n".join(rows) + "\n"
