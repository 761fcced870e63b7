"""Benchmark reports: aggregate measurements, write JSON + CSV, plot, summarise in Markdown.

A run of :func:`cvmfs_ml.bench.runner.run_profile` produces one *results document* (a dict,
written as ``results.json``; the schema is documented in docs/benchmarks.md and named by
:data:`SCHEMA`). This module turns its raw ``measurements`` (one row per subprocess) into the
``summary`` (one row per scenario: medians and spread over repeats, ratio to local disk),
writes ``results.csv`` / ``summary.csv``, draws the load-time plot and writes ``summary.md``.

Everything here is a pure function of the document, so a report can be re-made from an old
``results.json`` (``write_report(json.load(...), out_dir)``) without re-running anything.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError

__all__ = [
    "MEASUREMENT_FIELDS",
    "SCENARIO_KEY",
    "SCHEMA",
    "METRIC_LABELS",
    "SUMMARY_METRICS",
    "check_results",
    "load_results",
    "machine_info",
    "metric_label",
    "plot_load_times",
    "summarise",
    "versions",
    "write_csv",
    "write_markdown",
    "write_report",
]

SCHEMA = "cvmfs-ml-bench/1"

SCENARIO_KEY = ("model", "runtime", "mode", "network", "cache_state")
"""The fields that identify a scenario; repeats of one scenario share them."""

MEASUREMENT_FIELDS = (
    "model", "runtime", "mode", "network", "cache_state", "repeat", "ok", "error",
    "model_bytes", "import_s", "acquire_s", "open_s", "first_run_s", "first_inference_s",
    "first_token_s", "latency_p50_s", "latency_p95_s", "tokens_per_s", "peak_rss_bytes",
    "major_faults", "rchar", "disk_read_bytes", "origin_requests", "origin_bytes", "proxy_bytes",
    "pre_resident_fraction", "post_resident_fraction", "output_sha256", "wall_s", "prepare_s",
)
"""Columns of ``results.csv``: one row per measurement (see docs/benchmarks.md)."""

SUMMARY_METRICS = (
    "open_s", "first_inference_s", "first_token_s", "first_run_s", "latency_p50_s",
    "latency_p95_s", "tokens_per_s", "peak_rss_bytes", "origin_requests", "origin_bytes",
    "major_faults", "acquire_s", "wall_s",
)
"""Metrics aggregated per scenario: median, min and max over the successful repeats."""

METRIC_LABELS = {
    "open_s": "time to load (s)",
    "first_inference_s": "time to first inference (s)",
    "first_run_s": "first run (s)",
    "first_token_s": "time to first token (s)",
    "latency_p50_s": "inference latency, median (s)",
    "latency_p95_s": "inference latency, 95th percentile (s)",
    "tokens_per_s": "tokens per second",
    "peak_rss_bytes": "peak resident memory (bytes)",
    "acquire_s": "time to fetch (s)",
    "wall_s": "wall time (s)",
}
"""Axis labels for the metrics: what a reader sees instead of the JSON key."""


def metric_label(metric: str) -> str:
    """A plot label for ``metric``: a phrase with its unit, never the raw key."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


# --------------------------------------------------------------------------------------------
# environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _binary_version(binary: str, args: Sequence[str]) -> str | None:
    from cvmfs_ml.testing import find_binary

    path = find_binary(binary)
    if path is None:
        return None
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0][:120] if text else None


def versions() -> dict[str, str | None]:
    """Versions of the Python packages and servers a result depends on (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("cvmfs-ml", "numpy", "onnxruntime", "onnx", "safetensors", "torch",
                 "weaver-core", "urllib3", "fsspec", "oras", "mfusepy", "pyfuse3", "matplotlib"):
        out[dist] = _version(dist)
    out["nginx"] = _binary_version("nginx", ["-v"])
    out["squid"] = _binary_version("squid", ["-v"])
    out["docker-registry"] = _binary_version("docker-registry", ["--version"])
    return out


def machine_info() -> dict[str, Any]:
    """Host facts that explain a number: CPU, cores, memory, kernel, file system of the work dir."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "root": os.geteuid() == 0,
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# aggregation


_STATE_ORDER = {"cold": 0, "warm": 1, "hot": 2}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


_SCALARS = (str, int, float, bool, type(None))


def check_results(doc: Any, what: str = "results.json") -> dict[str, Any]:
    """``doc`` if it has the shape of a ``bench run`` result, else :class:`FormatError`.

    Results files are passed around (CI artefacts, another machine's run, an older version's),
    so ``bench compare`` and ``bench export`` read them as outside input: rows that are not
    objects, or scenario fields that are lists, used to end in a ``TypeError`` deep inside.
    """
    if not isinstance(doc, dict):
        raise FormatError(what, f"not a benchmark result ({SCHEMA}): not a JSON object")
    if "summary" not in doc and "measurements" not in doc:
        raise FormatError(what, f"not a benchmark result ({SCHEMA}): no summary or measurements")
    for section in ("measurements", "summary"):
        if section not in doc:
            continue
        rows = doc[section]
        if not isinstance(rows, list):
            raise FormatError(what, f"'{section}' is not a list")
        for number, row in enumerate(rows):
            if not isinstance(row, dict):
                raise FormatError(what, f"{section}[{number}] is not an object")
            odd = [k for k in SCENARIO_KEY if not isinstance(row.get(k), _SCALARS)]
            if odd:
                raise FormatError(what, f"{section}[{number}]: {', '.join(odd)} "
                                        "not text or a number")  # fmt: skip
    for field in ("versions", "machine"):
        if field in doc and not isinstance(doc[field], dict):
            raise FormatError(what, f"'{field}' is not an object")
    return doc


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked document of a ``results.json`` file (:func:`check_results`)."""
    try:
        return check_results(jsontext.loads(Path(path).read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise FormatError(str(path), f"not JSON: {exc}") from exc


def summarise(measurements: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario: ``n``, ``failed``, and for each metric the median, min and max.

    ``ratio_to_local`` divides the median ``first_inference_s`` by local disk's for the same
    model, runtime and cache state (local disk has no client cache, so ``warm`` compares with
    local ``cold``); ``outputs_match_local`` says whether every output digest equals local's.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in measurements:
        groups.setdefault(tuple(row.get(k) for k in SCENARIO_KEY), []).append(row)
    summary = []
    for key, rows in groups.items():
        ok = [r for r in rows if r.get("ok")]
        entry: dict[str, Any] = dict(zip(SCENARIO_KEY, key, strict=True))
        entry["model_bytes"] = next((r.get("model_bytes") for r in rows), None)
        entry["n"] = len(ok)
        entry["failed"] = len(rows) - len(ok)
        for metric in SUMMARY_METRICS:
            values = [v for r in ok if (v := _num(r.get(metric))) is not None]
            entry[metric] = statistics.median(values) if values else None
            entry[f"{metric}_min"] = min(values) if values else None
            entry[f"{metric}_max"] = max(values) if values else None
        entry["output_sha256"] = sorted({r.get("output_sha256") for r in ok
                                         if r.get("output_sha256")})
        summary.append(entry)
    local = {(s["model"], s["runtime"], s["cache_state"]): s for s in summary
             if s["mode"] == "local"}
    for s in summary:
        ref = local.get((s["model"], s["runtime"], s["cache_state"])) or local.get(
            (s["model"], s["runtime"], "cold"))
        mine, theirs = s.get("first_inference_s"), (ref or {}).get("first_inference_s")
        s["ratio_to_local"] = (mine / theirs) if mine is not None and theirs else None
        s["outputs_match_local"] = (None if ref is None or not s["output_sha256"]
                                    else s["output_sha256"] == ref["output_sha256"])
    # Keep the order the scenarios ran in (local first), cold before warm before hot.
    mode_order = {m: i for i, m in enumerate(dict.fromkeys(s["mode"] for s in summary))}
    summary.sort(key=lambda s: (str(s["network"]), str(s["model"]),
                                mode_order[s["mode"]], _STATE_ORDER.get(s["cache_state"], 9)))
    return summary


# --------------------------------------------------------------------------------------------
# files


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
              fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV; lists become ``;``-joined strings, missing values empty cells."""
    path = Path(path)
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                             for k, v in row.items()})
    return path


def plot_load_times(summary: Sequence[Mapping[str, Any]], out_png: str | os.PathLike[str],
                    *, network: str = "loopback",
                    metric: str = "first_inference_s") -> Path | None:
    """Bars of ``metric`` (median, min-max whiskers) per mode and cache state, one panel per model.

    Returns None when there is nothing to plot for ``network``.
    """
    rows = [s for s in summary if s["network"] == network and s.get(metric) is not None]
    if not rows:
        return None
    from cvmfs_ml.bench.heatmap import _pyplot

    plt = _pyplot()
    models = list(dict.fromkeys(s["model"] for s in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 4.0), squeeze=False)
    states = sorted({s["cache_state"] for s in rows}, key=lambda x: _STATE_ORDER.get(x, 9))
    colours = {"cold": "#3b6fb6", "warm": "#e6a23c", "hot": "#c0392b"}
    for ax, model in zip(axes.flat, models, strict=True):
        mine = [s for s in rows if s["model"] == model]
        modes = list(dict.fromkeys(s["mode"] for s in mine))
        width = 0.8 / max(1, len(states))
        for j, state in enumerate(states):
            xs, ys, lo, hi = [], [], [], []
            for i, mode in enumerate(modes):
                s = next((s for s in mine if s["mode"] == mode and s["cache_state"] == state),
                         None)
                if s is None:
                    continue
                xs.append(i + (j - (len(states) - 1) / 2) * width)
                ys.append(s[metric])
                lo.append(s[metric] - (s.get(f"{metric}_min") or s[metric]))
                hi.append((s.get(f"{metric}_max") or s[metric]) - s[metric])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=state,
                   color=colours.get(state))
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, rotation=20)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(metric_label(metric))
        mb = (mine[0].get("model_bytes") or 0) / 2**20
        ax.set_title(f"{model} ({mb:.1f} MiB)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric_label(metric)} by storage mode and cache state ({network})")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_concurrency(rows: Sequence[Mapping[str, Any]],
                     out_png: str | os.PathLike[str]) -> Path | None:
    """Median and max client wall time against the number of concurrent clients."""
    rows = [r for r in rows if r.get("clients")]
    if not rows:
        return None
    from cvmfs_ml.bench.heatmap import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = sorted(rows, key=lambda r: r["clients"])
    n = [r["clients"] for r in rows]
    ax.plot(n, [r["wall_s_median"] for r in rows], "o-", label="median client")
    ax.plot(n, [r["wall_s_max"] for r in rows], "s--", label="slowest client")
    ax.set_xlabel("concurrent clients (cold, one Squid)")
    ax.set_ylabel("time to first inference (s)")
    ax.set_xticks(n)
    ax.legend()
    ax.set_title(f"{rows[0].get('model')} through one Squid")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt_s(v: Any) -> str:
    if v is None:
        return "–"
    if v < 0.001:
        return f"{v * 1e6:.0f} µs"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_bytes(v: Any) -> str:
    if v is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{int(v)} B"


def write_markdown(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A human summary: settings, one table per model and network, checks, extras."""
    lines = [f"# cvmfs-ml benchmark: profile `{doc.get('profile')}`", ""]
    machine = doc.get("machine", {})
    lines += [
        f"- run `{doc.get('run_id')}`, {doc.get('started')} → {doc.get('finished')}",
        f"- machine: {machine.get('cpu_model')}, {machine.get('cpu_count')} CPUs, "
        f"{_fmt_bytes(machine.get('memory_bytes'))} RAM, kernel {machine.get('kernel')}",
        f"- origin: {doc.get('settings', {}).get('origin')}; page cache dropped with "
        f"{doc.get('settings', {}).get('drop_method')}",
    ]
    for name, text in doc.get("network", {}).items():
        lines.append(f"- network `{name}`: {text}")
    lines.append("")
    summary = doc.get("summary", [])
    for network in dict.fromkeys(s["network"] for s in summary):
        for model in dict.fromkeys(s["model"] for s in summary if s["network"] == network):
            rows = [s for s in summary if s["network"] == network and s["model"] == model]
            size = _fmt_bytes(rows[0].get("model_bytes"))
            lines += [f"## {model} ({size}, {rows[0]['runtime']}) — {network}", "",
                      "| mode | cache | first inference (median [min–max]) | × local | open | "
                      "p50 / p95 | tokens/s | fetched | requests | peak RSS | n |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for s in rows:
                spread = (f"{_fmt_s(s['first_inference_s'])} "
                          f"[{_fmt_s(s['first_inference_s_min'])}–"
                          f"{_fmt_s(s['first_inference_s_max'])}]")
                ratio = f"{s['ratio_to_local']:.2f}" if s.get("ratio_to_local") else "–"
                tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "–"
                reqs = (f"{s['origin_requests']:.0f}" if s.get("origin_requests") is not None
                        else "–")
                lines.append(
                    f"| {s['mode']} | {s['cache_state']} | {spread} | {ratio} | "
                    f"{_fmt_s(s['open_s'])} | {_fmt_s(s['latency_p50_s'])} / "
                    f"{_fmt_s(s['latency_p95_s'])} | {tps} | {_fmt_bytes(s['origin_bytes'])} | "
                    f"{reqs} | {_fmt_bytes(s['peak_rss_bytes'])} | {s['n']}"
                    + (f" ({s['failed']} failed)" if s["failed"] else "") + " |")
            lines.append("")
    checks = doc.get("checks", {})
    if checks:
        lines += ["## Sanity checks", ""]
        for name, check in checks.items():
            verdict = "PASS" if check.get("ok") else "FAIL"
            lines.append(f"- **{verdict}** {name}: {check.get('detail', '')}")
        lines.append("")
    conc = doc.get("concurrency", [])
    if conc:
        lines += ["## Concurrent cold clients through one Squid", "",
                  "| clients | model | wall median | wall max | origin requests | origin bytes | "
                  "Squid hit ratio | client bytes |", "|---|---|---|---|---|---|---|---|"]
        for r in conc:
            hit = f"{r['hit_ratio']:.2f}" if r.get("hit_ratio") is not None else "–"
            lines.append(f"| {r['clients']} | {r['model']} | {_fmt_s(r['wall_s_median'])} | "
                         f"{_fmt_s(r['wall_s_max'])} | {r['origin_requests']} | "
                         f"{_fmt_bytes(r['origin_bytes'])} | {hit} | "
                         f"{_fmt_bytes(r.get('proxy_bytes'))} |")
        lines.append("")
    access = doc.get("access_patterns", [])
    if access:
        lines += ["## Access patterns (cold load)", "",
                  "| model | runtime | source | file | touched | reads | median read | "
                  "sequential | picture |", "|---|---|---|---|---|---|---|---|---|"]
        for a in access:
            frac = a.get("fraction_of_file")
            seq = a.get("sequential_fraction")
            med = a.get("median_read_size")
            picture = f"[{Path(a['png']).stem}]({a['png']})" if a.get("png") else "–"
            lines.append(
                f"| {a['model']} | {a['runtime']} | {a['source']} | {a.get('file', '*')} | "
                f"{'–' if frac is None else f'{frac * 100:.0f}%'} | {a.get('read_count', '–')} | "
                f"{_fmt_bytes(med)} | {'–' if seq is None else f'{seq * 100:.0f}%'} | "
                f"{picture} |")
        lines.append("")
    for skipped in doc.get("skipped", []):
        lines.append(f"- not measured: {skipped}")
    for extra in doc.get("errors", []):
        lines.append(f"- error: {extra}")
    out = Path(path)
    out.write_text("\n".join(lines) + "\n")
    return out


def write_report(doc: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, results.csv, summary.csv, summary.md, load-time plots and
    report.html (summary and plots on one page).

    Fills ``doc['summary']`` from ``doc['measurements']`` when it is missing. Returns the
    paths written, by role.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "summary" not in doc:
        doc["summary"] = summarise(doc.get("measurements", []))
    paths: dict[str, Path] = {}
    for network in dict.fromkeys(s["network"] for s in doc["summary"]):
        suffix = "" if network == "loopback" else f"_{network}"
        png = plot_load_times(doc["summary"], out / f"load_time{suffix}.png", network=network)
        if png is not None:
            paths[f"plot_{network}"] = png
            doc.setdefault("plots", []).append(png.name)
    if doc.get("concurrency"):
        png = plot_concurrency(doc["concurrency"], out / "concurrency.png")
        if png is not None:
            paths["plot_concurrency"] = png
            doc.setdefault("plots", []).append(png.name)
    doc["plots"] = sorted(set(doc.get("plots", [])))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    paths["json"] = out / "results.json"
    paths["csv"] = write_csv(doc.get("measurements", []), out / "results.csv",
                             MEASUREMENT_FIELDS)
    paths["summary_csv"] = write_csv(doc["summary"], out / "summary.csv")
    paths["markdown"] = write_markdown(doc, out / "summary.md")
    from cvmfs_ml.bench.html_report import write_html_report

    # The access pictures (residency maps, read heat maps) go on the page too, after the plots:
    # report.html is meant to be the one file people pass around.
    pictures = dict.fromkeys(str(a["png"]) for a in doc.get("access_patterns", []) if a.get("png"))
    paths["html"] = write_html_report(
        paths["markdown"], [out / name for name in [*doc["plots"], *pictures]], out / "report.html",
        title=f"cvmfs-ml benchmark: {doc.get('profile')} ({doc.get('run_id')})")
    return paths


def disk_usage(path: str | os.PathLike[str]) -> int:
    """Bytes of the files below ``path`` (repository sizes for the sweep)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_tree(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)
