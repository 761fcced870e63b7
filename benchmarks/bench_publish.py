"""Publish benchmark (issues 2 and 14): publish time against ``cp -r`` + ``sync`` of the input.

The benchmark lives in :mod:`cvmfs_ml.bench.publishbench` (rounds, references, upstream
detection), :mod:`cvmfs_ml.bench.publish_probe` (the child process of one publish) and
:mod:`cvmfs_ml.bench.publish_report` (tables and the per-stage breakdown); this is its command
line.

Usage::

    python benchmarks/bench_publish.py --scale 0.2                 # ~750 MB, 3 rounds
    python benchmarks/bench_publish.py --scale 1 --only none auto  # the issue's 3.76 GB
    python benchmarks/bench_publish.py --show bench-out/publish.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvmfs_ml.bench.publish_report import format_report
from cvmfs_ml.bench.publishbench import COMPRESSIONS, PublishOptions, run_publish_bench

_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.2,
                        help="multiply the content sizes (2 GiB + 1.5 GiB) by this")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians and spread)")
    parser.add_argument("--only", nargs="+", choices=COMPRESSIONS, default=["none", "auto", "isal"])
    parser.add_argument("--cache-dir", type=Path, default=_ROOT / "bench-out/cache/publish")
    parser.add_argument("--work-dir", type=Path, default=_ROOT / "bench-out/work/publish",
                        help="repositories and the cp -r copy (keep it on the inputs' disk)")
    parser.add_argument("--out", type=Path, default=_ROOT / "bench-out/publish.json")
    parser.add_argument("--global-drop", action="store_true",
                        help="also echo 1 > /proc/sys/vm/drop_caches (root; hits the machine)")
    parser.add_argument("--upstream-fqrn", help="a cvmfs_server repository to time side by side")
    parser.add_argument("--show", type=Path, metavar="JSON", help="re-print an earlier run")
    args = parser.parse_args(argv)
    if args.show:
        print(format_report(json.loads(args.show.read_text())))
        return 0
    if args.rounds < 1 or args.scale <= 0:
        parser.error("--rounds must be >= 1 and --scale > 0")
    options = PublishOptions(scale=args.scale, rounds=args.rounds, modes=tuple(args.only),
                             cache_dir=args.cache_dir, work_dir=args.work_dir,
                             global_drop=args.global_drop, upstream_fqrn=args.upstream_fqrn)
    report = run_publish_bench(options, log=lambda line: print(line, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(format_report(report))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
