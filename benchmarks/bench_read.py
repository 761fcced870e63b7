"""Read benchmark (issues 3, 8, 14): how fast does a cvmfs-ml client read a 2 GiB weights file?

The benchmark lives in :mod:`cvmfs_ml.bench.readbench` (cells), :mod:`cvmfs_ml.bench.read_probe`
(child processes) and :mod:`cvmfs_ml.bench.read_report` (goals, table); this is its command line.

Content, generated once into ``--cache`` (``bench-out/cache/read``) and reused: a 2 GiB
float16 ``model.safetensors`` (N(0, 0.02) weights, :func:`make_safetensors`) and a 1.5 GiB
LLM-shaped ONNX model with **float32** external data (:func:`make_llm_onnx`). float32 because
onnxruntime's CPU provider has no float16 GEMM: with float16 it would convert every weight to
float32 while creating the session (seconds of CPU, GBs of RSS), and the cell would measure
that conversion instead of I/O; with float32 it mmaps ``model.onnx.data`` as it would a real
checkpoint. Both are published into one repository with ``compression=none`` and upstream's
default content-defined chunks (4/8/16 MiB min/avg/max), as in the issue's upstream runs.

Origin: nginx (Debian's ``nginx-light``, configured as docs/nginx.conf) when installed, else
cvmfs-ml's built-in :class:`~cvmfs_ml.storage.http.RepositoryServer`; the report says which.
The origin also serves a plain copy of the weights file (``/cvmfs/raw/model.safetensors``):
the ``curl`` rows are one GET of the whole file, as the issue's curl figures are.

Networks (``--networks``): ``loopback`` (straight to the origin), ``rtt20`` (a
:class:`~cvmfs_ml.testing.netem.DelayProxy` in front: 20 ms RTT, handshake RTT on new
connections, no cap) and ``rtt20-cap84`` (the same plus 84 MB/s *per connection*; parallel
connections add up). The proxy runs in a thread of this driver, which only waits while a cell
runs.

The machine: before the cells, a probe writes 2 GiB into a new file twice
(:mod:`cvmfs_ml.bench.fresh_pages`) and reports CPU per GiB into fresh and into reused page
cache. On a VM whose host takes freed memory back (free page reporting), fresh pages cost
several times more, and a cold read through a cache fills about twice the file's size of them
where curl fills none; the table says so when the charge is there (``--no-fresh-page-probe``
skips it).

Cache states (every cell is one timed read of the whole file):

* ``cold`` - the client cache is wiped, the page cache of the local file and of the client
  cache folder is dropped (``posix_fadvise(DONTNEED)`` per file; ``--global-drop`` also writes
  ``/proc/sys/vm/drop_caches``, which disturbs everything else on the machine, so it is off by
  default) and the FUSE mount is fresh. The **origin's** page cache is *not* dropped: a
  Stratum 1 keeps hot objects in memory, and the issue's own curl figures (0.24 s for 2 GiB
  on loopback) were taken that way; ``--drop-origin`` drops it too, which makes "cold" include
  the origin's disk.
* ``warm`` - the client cache holds every object (the previous cold run filled it), its page
  cache is dropped, the mount is fresh.
* ``hot`` - nothing dropped: the same mount (its kernel page cache, ``keep_cache``) or, for
  fsspec, a new process whose cache files are in the page cache.

Modes: ``local`` (``cat`` of the local file), ``curl`` (one GET of the plain copy, body to
/dev/null), ``download`` (the same GET into a new file in the work folder, deleted after each
run: the download a user makes before loading, whose bytes end in the page cache as a mount's
do), ``fuse`` (``cat`` of the file on a cvmfs-ml FUSE mount, daemon started with
:func:`cvmfs_ml.client.fuse.mount`; the mount time is not counted) and ``fsspec`` (a fresh
Python process reads every byte through ``CvmfsFileSystem.open`` into a reused 8 MiB buffer;
the timed part is open + read, the repository boot is reported separately). Peak RSS is the
``VmHWM`` of the FUSE daemon (read from /proc before unmounting: the whole mount's life) and
of the fsspec process. Warm and hot cells do not touch the network (only the boot does), so
by default they run on loopback only (``--warm-networks``).

The ORT cell: ``onnxruntime.InferenceSession`` (default options) + the first ``run`` of the
ONNX model in a fresh process, local disk cold against a cold FUSE mount behind the 20 ms
proxy (``--ort-network``).

Usage::

    python benchmarks/bench_read.py --scale 0.05 --repeats 1      # quick check (~180 MB)
    python benchmarks/bench_read.py                               # the issue's cells
    python benchmarks/bench_read.py --networks loopback --modes fuse,fsspec --no-ort
    python benchmarks/bench_read.py --show bench-out/read.json    # re-print a run
    python benchmarks/bench_read.py --scale 0.5 --states warm,hot --modes local,fuse,fsspec \
        --no-ort --repeats 5                                      # warm and hot only (issue 14)

Times are medians of ``--repeats`` runs (``--cold-repeats`` for cold cells), with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.fresh_pages import measure_fresh_page_cost
from cvmfs_ml.bench.origin import Origin
from cvmfs_ml.bench.read_report import annotate, table, upstream_note
from cvmfs_ml.bench.readbench import (
    MODES,
    NETWORKS,
    STATES,
    Bench,
    ReadOptions,
    ensure_content,
    ensure_repository,
    network,
)

_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_CACHE = _ROOT / "bench-out" / "cache" / "read"
_DEFAULT_WORK = _ROOT / "bench-out" / "work" / "read"
_DEFAULT_OUT = _ROOT / "bench-out" / "read.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
    parser.add_argument(
        "--cache",
        type=Path,
        default=_DEFAULT_CACHE,
        help="where generated content is kept between runs",
    )
    parser.add_argument(
        "--work", type=Path, default=_DEFAULT_WORK, help="repository, client cache and mount point"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the content")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument(
        "--warm-networks", default="loopback", help="networks that also get warm and hot cells"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--states", default=",".join(STATES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="prefetch workers of the client (default: the client's)",
    )
    parser.add_argument("--server", choices=("auto", "nginx", "builtin"), default="auto")
    parser.add_argument(
        "--drop-origin",
        action="store_true",
        help="also drop the origin's page cache before cold runs",
    )
    parser.add_argument(
        "--global-drop",
        action="store_true",
        help="also echo 1 > /proc/sys/vm/drop_caches (root; whole machine)",
    )
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--ort-only", action="store_true")
    parser.add_argument("--ort-network", default="rtt20")
    parser.add_argument(
        "--prepare", action="store_true", help="only generate and publish the content"
    )
    parser.add_argument(
        "--no-fresh-page-probe",
        dest="fresh_page_probe",
        action="store_false",
        help="skip the probe of what fresh page cache costs on this machine (2 GiB, ~3 s)",
    )
    parser.add_argument("--show", type=Path, help="print the table of a saved run and exit")
    args = parser.parse_args(argv)
    if args.show:
        print(table(json.loads(args.show.read_text())))
        return 0

    networks = [n for n in args.networks.split(",") if n]
    warm_networks = set(args.warm_networks.split(","))
    modes = [m for m in args.modes.split(",") if m]
    states = tuple(s for s in args.states.split(",") if s)
    for n in networks:
        if n not in NETWORKS:
            parser.error(f"unknown network {n}; choose from {', '.join(NETWORKS)}")
    content = ensure_content(args.cache, args.scale)
    published = ensure_repository(args.work, content, args.scale)
    if args.prepare:
        return 0
    work = args.work / f"scale{args.scale:g}" / "run"
    work.mkdir(parents=True, exist_ok=True)
    prefer = {"auto": "nginx", "nginx": "require-nginx", "builtin": "builtin"}[args.server]
    origin = Origin(published.srv, prefer, log=print)
    options = ReadOptions(repeats=args.repeats, cold_repeats=args.cold_repeats,
                          parallel=args.parallel, drop_origin=args.drop_origin,
                          global_drop=args.global_drop)
    bench = Bench(options, content, published, origin, work)
    started = time.perf_counter()
    try:
        bench.origin_description = origin.describe()
        print(
            f"origin: {bench.origin_description}; {published.chunks} chunks "
            f"(min/median/max {[s // 2**20 for s in published.chunk_sizes]} MiB)",
            flush=True,
        )
        fresh = None
        if args.fresh_page_probe:
            try:
                fresh = measure_fresh_page_cost(work)
                print(fresh.describe(), flush=True)
            except OSError as exc:  # e.g. no room for its 2 GiB: the cells run without it
                print(f"fresh page probe skipped: {exc}", flush=True)
        if not args.ort_only:
            if "local" in modes:
                bench.local()
            for net in networks:
                with network(net, origin.port) as (port, description):
                    bench.networks_seen[net] = description
                    print(f"network {net}: {description}", flush=True)
                    cell_states = (
                        states if net in warm_networks else tuple(s for s in states if s == "cold")
                    )
                    if "curl" in modes and "cold" in states:
                        bench.curl(net, port)
                    if "download" in modes and "cold" in states:
                        bench.curl(net, port, into_file=True)
                    if "fuse" in modes and cell_states:
                        bench.fuse(net, port, cell_states)
                    if "fsspec" in modes and cell_states:
                        bench.fsspec(net, port, cell_states)
        if not args.no_ort:
            with network(args.ort_network, origin.port) as (port, description):
                bench.networks_seen[args.ort_network] = description
                bench.ort(port, args.ort_network)
    finally:
        origin.close()
    size = content.weights_bytes
    doc: dict[str, Any] = {
        "benchmark": "read (issues 3, 8, 14)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "weights_bytes": size,
        "onnx_data_bytes": (content.onnx.parent / "model.onnx.data").stat().st_size,
        "chunks": published.chunks,
        "chunk_sizes": published.chunk_sizes,
        "origin": bench.origin_description,
        "networks": bench.networks_seen,
        "cold_definition": "client cache wiped; page cache of the local file and the client "
        "cache dropped (posix_fadvise DONTNEED"
        + (", global drop_caches" if args.global_drop else "")
        + "); fresh "
        "mount; origin page cache " + ("dropped" if args.drop_origin else "kept (warm origin)"),
        "curl": "one GET of a plain copy of the file served by the same origin",
        "download": "the same GET into a new file on local disk (curl -o)",
        "fsspec": "fresh process, CvmfsFileSystem.open + readinto of an 8 MiB buffer; "
        "read_s excludes the repository boot (details.boot_s)",
        "parallel": args.parallel,
        "upstream": upstream_note(),
        "fresh_page_cost": fresh.to_json() if fresh is not None else None,
        "cells": [c.to_json(size) for c in bench.cells],
    }
    annotate(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print()
    print(table(doc))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
