"""The read benchmark's goals and table (``benchmarks/bench_read.py``'s output).

Goals are the issues' (ratios measured in the same run, so a loaded machine moves both sides):

* cold, FUSE and fsspec: at most 1.5x the single-stream download (``curl``) on the same network
  (issue 8: "cold 2 GiB over 20 ms RTT <= 1.5x the download"); ``×dl`` also shows the ratio to
  the same download into a local file (``download``), which, like a cold read of a mount, ends
  with the bytes in the page cache where ``curl`` to ``/dev/null`` keeps none;
* warm (client cache full, page cache dropped): at most 1.1x local disk cold (issue 14; issue 8
  asked for 1.3x);
* hot: at most 1.2x local disk hot (issue 14);
* onnxruntime with 1.5 GiB of external data, cold through FUSE at 20 ms: at most 1.5x local;
* peak RSS: the FUSE daemon under 200 MB, an fsspec reader under 300 MB.

Upstream ``cvmfs2`` figures quoted beside ours are the issues' (another machine): they are
context, not a ratio from this run. Where ``cvmfs2`` is not installed (it is not on these
machines, and no network but PyPI/Debian exists to build it) the table says so.

"In every run, not on average" (issue 14): the ``worst`` column divides the slowest run of a
cell by the median of its baseline, and ``paired`` is the largest ratio of a warm or hot run to
the local ``cat`` timed just before it in the same round (warm against local cold, hot against
local hot), which a load drifting during the benchmark moves on both sides; a goal is met in
every run when that is within it. The breakdown below the table (issue 14 item 1) shows per
warm and hot run where the FUSE daemon's time went (:mod:`cvmfs_ml.client.readprofile`) and
how busy the disk was.
"""

from __future__ import annotations

import shutil
import statistics
from typing import Any

__all__ = ["GOALS", "annotate", "breakdown", "table", "upstream_note"]

GOALS = {"cold_vs_curl": 1.5, "warm_vs_local_cold": 1.1, "hot_vs_local_hot": 1.2,
         "ort_vs_local": 1.5, "daemon_rss_mb": 200.0, "fsspec_rss_mb": 300.0}

# The issues' upstream cvmfs2 figures (seconds) for the same cells, and curl's and local disk's.
UPSTREAM: dict[tuple[str, str], float] = {
    ("loopback", "cold"): 4.75,  # issue 3
    ("rtt20", "cold"): 14.3,  # issue 8
    ("rtt20-cap84", "cold"): 33.8,  # issue 3
    ("loopback", "warm"): 1.90,  # issue 14
    ("loopback", "hot"): 0.35,  # issue 14
}
UPSTREAM_CURL = {"loopback": 0.24, "rtt20": 1.95, "rtt20-cap84": 25.6}
UPSTREAM_ORT = {"local": 1.08, "cvmfs": 11.1}


def _fmt(x: float | None, unit: str = "s") -> str:
    return "–" if x is None else f"{x:.2f}{unit}" if unit != "x" else f"{x:.2f}x"


def _median_of(rows: list[dict[str, Any]], mode: str, state: str, network: str | None = None
               ) -> float | None:
    return next((r["median_s"] for r in rows if r["mode"] == mode and r["state"] == state
                 and (network is None or r["network"] == network)), None)


def paired_ratios(row: dict[str, Any]) -> list[float]:
    """Each run's time over the local ``cat`` timed just before it in the same round."""
    out = []
    for t, d in zip(row.get("runs", []), row.get("details", []), strict=False):
        local = d.get("local_s") if isinstance(d, dict) else None
        if local:
            out.append(t / local)
    return out


def annotate(doc: dict[str, Any]) -> None:
    """Add each cell's goal (seconds, from this run's baselines) and whether it is met."""
    rows = doc["cells"]
    local_cold = _median_of(rows, "local", "cold")
    local_hot = _median_of(rows, "local", "hot")
    ort_local = _median_of(rows, "ort-local", "cold")
    for r in rows:
        goal = None
        if r["mode"] in ("fuse", "fsspec"):
            if r["state"] == "cold":
                curl = _median_of(rows, "curl", "cold", r["network"])
                goal = GOALS["cold_vs_curl"] * curl if curl else None
            elif r["state"] == "warm" and local_cold:
                goal = GOALS["warm_vs_local_cold"] * local_cold
            elif r["state"] == "hot" and local_hot:
                goal = GOALS["hot_vs_local_hot"] * local_hot
        elif r["mode"] == "ort-fuse" and ort_local:
            goal = GOALS["ort_vs_local"] * ort_local
        r["goal_s"] = goal
        r["goal_met"] = None if goal is None or r["median_s"] is None else r["median_s"] <= goal
        paired = paired_ratios(r)
        if paired:
            r["paired_worst"] = max(paired)
            limit = {"warm": GOALS["warm_vs_local_cold"], "hot": GOALS["hot_vs_local_hot"]}
            if r["state"] in limit:
                r["goal_met_every_run"] = max(paired) <= limit[r["state"]]
        r["upstream_s"] = (UPSTREAM_CURL.get(r["network"]) if r["mode"] == "curl"
                           else UPSTREAM.get((r["network"], r["state"]))
                           if r["mode"] in ("fuse", "fsspec") else None)
        limit = {"fuse": GOALS["daemon_rss_mb"], "ort-fuse": GOALS["daemon_rss_mb"],
                 "fsspec": GOALS["fsspec_rss_mb"]}.get(r["mode"])
        if limit is not None and r.get("peak_rss_bytes"):
            r["rss_goal_met"] = r["peak_rss_bytes"] < limit * 2**20


def table(doc: dict[str, Any]) -> str:
    """The run as a text table: medians, spread, ratios, goals, upstream's figures, RSS, CPU."""
    rows = doc["cells"]
    size = doc["weights_bytes"]
    local = {r["state"]: r["median_s"] for r in rows if r["mode"] == "local"}
    lines = [
        f"{doc['weights_bytes'] / 2**30:.2f} GiB float16 file, {doc['chunks']} chunks, "
        f"origin {doc['origin']}",
        f"{'network':<12} {'mode':<9} {'state':<5} {'median':>8} {'min–max':>13} "
        f"{'GB/s':>6} {'×local':>7} {'worst':>6} {'paired':>6} {'×curl':>6} {'×dl':>6} "
        f"{'goal':>6} "
        f"{'met':>4} {'all':>4} "
        f"{'upstream*':>9} {'peak RSS':>9} {'client CPU':>10}",
    ]
    for r in rows:
        med = r["median_s"]
        if r["mode"].startswith("ort") or med is None:
            continue
        base = local.get("cold") if r["state"] in ("cold", "warm") else local.get(r["state"])
        curl = _median_of(rows, "curl", "cold", r["network"]) if r["state"] == "cold" else None
        dl = _median_of(rows, "download", "cold", r["network"]) if r["state"] == "cold" else None
        fetcher = r["mode"] in ("fuse", "fsspec")
        rss = r.get("peak_rss_bytes")
        met = {None: "", True: "yes", False: "no"}[r.get("goal_met")]
        every = {None: "", True: "yes", False: "no"}[r.get("goal_met_every_run")]
        cpus = [d.get("daemon_cpu_s", d.get("process_cpu_s")) for d in r.get("details", [])
                if isinstance(d, dict)]
        cpus = [c for c in cpus if c is not None]
        cpu = f"{statistics.median(cpus):.2f}s" if cpus else "–"
        lines.append(
            f"{r['network']:<12} {r['mode']:<9} {r['state']:<5} {med:7.2f}s "
            f"{r['min_s']:5.2f}–{r['max_s']:<5.2f}s {size / med / 1e9:6.2f} "
            f"{_fmt(med / base if base else None, 'x'):>7} "
            f"{_fmt(r['max_s'] / base if base else None, 'x'):>6} "
            f"{_fmt(r.get('paired_worst'), 'x'):>6} "
            f"{_fmt(med / curl if curl and r['mode'] != 'curl' else None, 'x'):>6} "
            f"{_fmt(med / dl if dl and fetcher else None, 'x'):>6} "
            f"{_fmt(r.get('goal_s')):>6} {met:>4} {every:>4} {_fmt(r.get('upstream_s')):>9} "
            f"{(f'{rss / 2**20:.0f} MiB' if rss else '–'):>9} {cpu:>10}")
    ort = [r for r in rows if r["mode"].startswith("ort")]
    if ort:
        lines += ["", "onnxruntime session + first run, 1.5 GiB float32 external data, cold:"]
        base = _median_of(rows, "ort-local", "cold")
        for r in ort:
            d = r["details"]
            create = statistics.median(x["create_s"] for x in d) if d else 0
            run = statistics.median(x["run_s"] for x in d) if d else 0
            up = UPSTREAM_ORT["local" if r["mode"] == "ort-local" else "cvmfs"]
            goal = r.get("goal_s")
            lines.append(
                f"  {r['mode']:<9} {r['network']:<8} {r['median_s']:6.2f}s "
                f"({r['min_s']:.2f}–{r['max_s']:.2f}; create {create:.2f} + run {run:.2f}) "
                f"×local {_fmt(r['median_s'] / base if base else None, 'x')}  "
                f"upstream* {up:.2f}s"
                + (f"  goal {goal:.2f}s met: {'yes' if r.get('goal_met') else 'no'}"
                   if goal else ""))
    lines += ["", "×local: warm and cold against local cold, hot against local hot; worst: the "
              "slowest run against the same median; paired: the worst run against the local cat "
              "timed just before it (cold for warm, hot for hot), and all: whether that is "
              "within the goal; ×curl: against "
              "the single-stream download on the same network (body to /dev/null); ×dl: against "
              "the same download into a local file; client CPU: user+sys seconds of "
              "the FUSE daemon (cat excluded) or of the whole fsspec process; upstream*: the "
              "issues' cvmfs2 figures from another machine (context, not this run)",
              doc.get("upstream") or upstream_note()]
    rss = [r for r in rows if r.get("rss_goal_met") is not None]
    if rss:
        worst = max(rss, key=lambda r: r["peak_rss_bytes"])
        lines.append(f"peak RSS, worst cell: {worst['peak_rss_bytes'] / 2**20:.0f} MiB "
                     f"({worst['mode']}; goals: daemon < {GOALS['daemon_rss_mb']:.0f} MB, "
                     f"fsspec < {GOALS['fsspec_rss_mb']:.0f} MB)")
    fresh = doc.get("fresh_page_cost")
    if fresh:
        lines.append(fresh_page_note(fresh))
    lines += breakdown(doc)
    return "\n".join(lines)


def fresh_page_note(fresh: dict[str, Any]) -> str:
    """The machine's charge for fresh page cache (:mod:`.fresh_pages`), in one line."""
    note = (f"page cache on this machine: {fresh['fresh_s_per_gib']:.2f} s CPU per GiB written "
            f"into fresh pages, {fresh['reused_s_per_gib']:.2f} s into reused ones")
    if fresh.get("charge_s_per_gib", 0) >= 0.2:
        note += ("; a cold read through a cache (FUSE or fsspec) fills at least the file's "
                 "size of it, as a download into a file does (×dl), and curl to /dev/null "
                 "none, so that charge weighs on the ×curl ratios here")
    return note


def upstream_note() -> str:
    """Whether upstream's client can run side by side here, in one line."""
    found = shutil.which("cvmfs2")
    if found:
        return f"upstream cvmfs2 found at {found}, but this benchmark does not mount it yet"
    return ("upstream cvmfs2: not installed on this machine, so no side-by-side column; "
            "our figures are against local disk and curl measured in this run")


def _g(profile: dict[str, Any], key: str) -> float:
    return float(profile.get(key, 0) or 0)


def breakdown(doc: dict[str, Any]) -> list[str]:
    """Per warm/hot run: where the time went (issue 14 item 1), from the daemon's counters."""
    rows = [r for r in doc["cells"] if r["mode"] in ("fuse", "fsspec", "local")
            and r["state"] in ("warm", "hot", "cold") and r.get("details")]
    lines: list[str] = []
    for r in rows:
        runs = [(t, d) for t, d in zip(r["runs"], r["details"], strict=False)
                if isinstance(d, dict) and (d.get("read_profile") or "disk_busy_s" in d)]
        if not runs or (r["mode"] == "local" and r["state"] != "cold"):
            continue
        if not lines:
            lines += ["", "Where the time goes, per run (seconds; loop = the FUSE daemon's event "
                      "loop; reply = loop CPU outside the read handler: pyfuse3 receiving "
                      "requests and copying answers to the kernel; idle = wall - loop CPU; "
                      "reads answered on the loop / in a worker thread; lookups, CRC passes and "
                      "pieces paged in ahead as count/seconds of a background thread):"]
        lines.append(f"  {r['network']} {r['mode']} {r['state']}:")
        for t, d in runs:
            p = d.get("read_profile") or {}
            disk = (f"disk {d['disk_mib']:.0f} MiB busy {d['disk_busy_s']:.2f}"
                    if "disk_busy_s" in d else "disk –")
            if r["mode"] == "local" or not p:
                lines.append(f"    wall {t:.2f}  {disk}")
                continue
            loop_cpu = _g(p, "loop_cpu_seconds")
            handler = _g(p, "handler_seconds")
            cpu = d.get("daemon_cpu_s", d.get("process_cpu_s"))
            local = d.get("local_s")
            lines.append(
                f"    wall {t:.2f}"
                + (f" (local {local:.2f}, {t / local:.2f}x)" if local else "")
                + f"  {disk}  CPU {cpu if cpu is not None else '–'}"
                + (f"  loop CPU {loop_cpu:.2f} (handler {handler:.2f}, reply "
                   f"{max(0.0, loop_cpu - handler):.2f}) idle {max(0.0, t - loop_cpu):.2f}"
                   if loop_cpu else "")
                + f"  reads {_g(p, 'loop_reads'):.0f}/{_g(p, 'thread_reads'):.0f}"
                f" (nowait misses {_g(p, 'nowait_misses'):.0f})"
                f"  preadv {_g(p, 'pread_seconds'):.2f} for {_g(p, 'pread_bytes') / 2**20:.0f} MiB"
                f"  lookups {_g(p, 'lookup_count'):.0f}/{_g(p, 'lookup_seconds'):.2f}"
                f"  CRC {_g(p, 'crc_files'):.0f}/{_g(p, 'crc_seconds'):.2f}"
                f"  advised {_g(p, 'advise_pieces'):.0f}/{_g(p, 'advise_seconds'):.2f}")
    return lines
