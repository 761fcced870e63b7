"""Chunk-size and compression sweep (issue 5 item 10) on the 2 GiB LLM-shaped model.

A thin wrapper around :func:`cvmfs_ml.bench.sweep.run_sweep` (``cvmfs-ml bench sweep``): for
each chunk setting × compression, a fresh repository, the publish time and size, the bytes a
5% fine-tune adds (dedup), and the cold load time through a FUSE mount.

Usage::

    python benchmarks/bench_sweep.py             # 4/8/16 and 16/32/64 MiB × zlib, none
    python benchmarks/bench_sweep.py --size-mib 256 --chunks 1/2/4,4/8/16,off
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvmfs_ml.bench.runner import default_workdir
from cvmfs_ml.bench.sweep import parse_points, run_sweep
from cvmfs_ml.bench.zoo import ModelSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--chunks", default="4/8/16,16/32/64")
    parser.add_argument("--compression", default="zlib,none")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--load-mode", default="fuse", choices=("fuse", "fsspec"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-results/sweep"))
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = ModelSpec(f"llm-{args.size_mib}m", "llm", size=args.size_mib * 2**20,
                     dtype="float32")
    doc = run_sweep(spec, parse_points(args.chunks, args.compression), args.out,
                    workdir=args.work or default_workdir(args.out),
                    fine_tune_fraction=args.fraction,
                    load_mode=args.load_mode, repeats=args.repeats,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print((args.out / "sweep.md").read_text())
    return 0 if all(not p["errors"] for p in doc["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
