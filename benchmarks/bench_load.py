"""Model-load benchmark (issue 5): the full profile, 2 GiB models, every storage mode.

A thin wrapper around :func:`cvmfs_ml.bench.runner.run_profile` (the same as
``cvmfs-ml bench run --profile full``) that also prints the table the issue asks for: the
2 GiB LLM-shaped model's time to first inference per storage mode and cache state, with the
ratio to local disk. Everything else (CSV, JSON, plots, heat maps, summary.md) is in ``--out``.

Usage::

    python benchmarks/bench_load.py                      # full profile (~30-60 min, ~25 GB disk)
    python benchmarks/bench_load.py --profile short      # the CI profile (~1-2 min)
    python benchmarks/bench_load.py --modes local,fuse --networks loopback --repeats 1

Models, the published repository and caches are kept in ``--work`` (default
``OUT/work``), so a second run does not regenerate or republish 4 GB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvmfs_ml.bench.runner import PROFILES, run_profile


def _table(doc: dict, model: str) -> str:
    rows = [s for s in doc["summary"] if s["model"] == model]
    lines = [f"{'network':<12} {'mode':<9} {'cache':<5} {'first inference':>16} "
             f"{'min–max':>17} {'× local':>8} {'peak RSS':>9}"]
    for s in rows:
        t = s["first_inference_s"]
        if t is None:
            continue
        ratio = f"{s['ratio_to_local']:.2f}" if s.get("ratio_to_local") else "–"
        rss = (s.get("peak_rss_bytes") or 0) / 2**30
        lines.append(f"{s['network']:<12} {s['mode']:<9} {s['cache_state']:<5} {t:>14.2f} s "
                     f"{s['first_inference_s_min']:>7.2f}–{s['first_inference_s_max']:<7.2f}s "
                     f"{ratio:>8} {rss:>7.2f} G")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES))
    parser.add_argument("--out", type=Path, default=Path("bench-results/load"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--modes", help="comma list (default: the profile's)")
    parser.add_argument("--networks", help="comma list (default: the profile's)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--global-drop", action="store_true",
                        help="also echo 1 > /proc/sys/vm/drop_caches before cold runs (root)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    changes: dict = {}
    if args.modes:
        changes["modes"] = tuple(args.modes.split(","))
    if args.networks:
        changes["networks"] = tuple(args.networks.split(","))
    if args.repeats:
        changes["repeats"] = args.repeats
    doc = run_profile(profile.with_(**changes), args.out, workdir=args.work,
                      global_drop=args.global_drop,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    big = max((m for m in doc["models"]), key=lambda m: m["bytes"])
    print(f"\n{big['name']} ({big['bytes'] / 2**30:.2f} GiB, {big['runtime']}):")
    print(_table(doc, big["name"]))
    print(f"\nreport: {args.out / 'summary.md'}; {len(doc['errors'])} errors")
    return 0 if all(c["ok"] for c in doc["checks"].values()) and not doc["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
