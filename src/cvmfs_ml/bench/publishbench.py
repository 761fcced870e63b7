"""The publish benchmark: how fast does cvmfs-ml turn model files into a repository?

``benchmarks/bench_publish.py`` is its command line; this module is the benchmark itself.

Content: the read benchmark's (a float16 safetensors file and an LLM-shaped ONNX model with
external data; 2 GiB + 1.5 GiB at ``scale`` 1), generated once into a cache folder and reused.

Each *round* measures, on cold inputs (page cache dropped per file with
``posix_fadvise(DONTNEED)``, residency checked with ``mincore``):

* ``cp -r`` of the input to a new folder on the same disk, followed by ``sync``: the local-disk
  floor for "read every byte, write every byte, durably" (issue 14's reference);
* a plain read of every input byte (the disk's read speed);
* one first publish per compression mode, each into a fresh repository and in a fresh process
  (:mod:`cvmfs_ml.bench.publish_probe`); its time runs from transaction start to the manifest
  swap and includes the publisher's own ``syncfs``, so it is as durable as ``cp -r`` + ``sync``.

Rounds interleave the references and the publishes, so slow phases of a shared machine hit both
sides of a ratio; the report gives medians, the spread (min-max) and the per-round ratios. The
publish's own per-stage counters (read, chunk, hash, compress, write, catalog, fsync, ...) are
printed per byte for the median run of each mode.

Side by side with upstream: where ``cvmfs_server`` is installed and ``--upstream-fqrn`` names a
repository made with ``cvmfs_server mkfs`` (root, Apache), each round also times
``cvmfs_server transaction``, ``cp -r`` into ``/cvmfs/FQRN`` and ``cvmfs_server publish``.
Where it is not installed, the report says so and stands on ``cp -r`` and the local disk.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.caches import drop_page_cache
from cvmfs_ml.bench.publish_probe import probe_publish
from cvmfs_ml.bench.readbench import ensure_content
from cvmfs_ml.bench.residency import resident_fraction

__all__ = ["COMPRESSIONS", "PublishOptions", "Samples", "run_publish_bench", "upstream_status"]

COMPRESSIONS = ("none", "auto", "zlib", "isal", "none+buffered", "auto+buffered")
"""Publish modes: the compression, and ``+buffered`` for ``CVMFS_ML_DIRECT_WRITES=false``
(objects written through the page cache), so both ways run in the same rounds."""
FQRN = "bench.publish.local"
_BLOCK = 8 * 2**20
GOAL_X_CP = 1.2  # issue 14: publish time / (cp -r + sync) time, for none and auto
GOAL_RSS = 300e6  # bytes


@dataclass(frozen=True)
class PublishOptions:
    scale: float = 0.2
    rounds: int = 3
    modes: tuple[str, ...] = ("none", "auto", "isal")
    cache_dir: Path = Path("bench-out/cache/publish")
    work_dir: Path = Path("bench-out/work/publish")
    global_drop: bool = False  # also drop the whole machine's page cache (root)
    upstream_fqrn: str | None = None  # a cvmfs_server repository to publish into, if any


@dataclass
class Samples:
    """Seconds of one measured thing over the rounds, with its details."""

    seconds: list[float] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)

    def add(self, seconds: float, detail: dict[str, Any] | None = None) -> None:
        self.seconds.append(seconds)
        self.details.append(detail or {})

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.seconds, "median_s": self.median, "min_s": min(self.seconds),
                "max_s": max(self.seconds), "details": self.details}


# --------------------------------------------------------------------------------------------
# cold inputs and the references


def input_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def make_cold(folder: Path, *, global_drop: bool) -> float:
    """Drop the inputs' page cache; return the fraction of their bytes still resident."""
    os.sync()
    drop_page_cache(folder, global_drop=global_drop)
    files = input_files(folder)
    total = sum(p.stat().st_size for p in files)
    resident = sum(resident_fraction(p) * p.stat().st_size for p in files)
    return round(resident / total, 4) if total else 0.0


def time_cp_sync(src: Path, work: Path) -> dict[str, Any]:
    """``cp -r`` then ``sync``: the time until the copy is on disk, as a publish's is."""
    dst = work / "cp-copy"
    if dst.exists():
        shutil.rmtree(dst)
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.sync()
    t2 = time.perf_counter()
    shutil.rmtree(dst)
    os.sync()
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": t2 - t0, "cp_s": t1 - t0, "sync_s": t2 - t1, "cpu": cpu}


def time_read(src: Path, *, digest: Callable[[], Any] | None = None) -> float:
    """Read every input byte once (and hash it with ``digest()``'s object, if given)."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    hasher = digest() if digest is not None else None
    t0 = time.perf_counter()
    for path in input_files(src):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if hasher is not None:
                    hasher.update(view[:n])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# repositories and upstream


def fresh_repository(work: Path, compression: str) -> Path:
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings

    base = work / compression
    if base.exists():
        shutil.rmtree(base)
    root = base / "srv"
    root.mkdir(parents=True)
    algorithm, _, variant = compression.partition("+")
    settings = PublishSettings(
        compression=Compression(algorithm), direct_writes=variant != "buffered"
    )
    create_repository(root, FQRN, keys_dir=base / "keys", settings=settings)
    os.sync()
    return root / FQRN


def upstream_status(fqrn: str | None) -> str | None:
    """Why upstream's publisher is not measured in this run, or None when it is."""
    if shutil.which("cvmfs_server") is None:
        return ("upstream cvmfs_server is not installed here: no upstream column; figures are "
                "against cp -r + sync and the local disk")
    if not fqrn:
        return ("cvmfs_server is installed, but no --upstream-fqrn repository was named (make "
                "one with: cvmfs_server mkfs -o $USER FQRN)")
    if not Path("/cvmfs", fqrn).is_dir():
        return f"/cvmfs/{fqrn} does not exist: is {fqrn} a cvmfs_server repository here?"
    return None


def time_upstream_publish(fqrn: str, src: Path) -> dict[str, Any]:
    """``cvmfs_server transaction``, ``cp -r`` of the input, ``cvmfs_server publish``.

    The repository is the user's and is kept: from the second round on it already holds the
    objects, so upstream hashes and compresses everything again but uploads nothing new (the
    report's spread shows it; the first round is the comparable first publish).
    """
    target = Path("/cvmfs", fqrn, "bench")
    t0 = time.perf_counter()
    subprocess.run(["cvmfs_server", "transaction", fqrn], check=True, capture_output=True)
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(["cp", "-r", str(src), str(target)], check=True)
    subprocess.run(["cvmfs_server", "publish", fqrn], check=True, capture_output=True)
    return {"seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# the run


def machine_probe() -> dict[str, float]:
    """SHA-1 of 64 MiB on one thread, then on two: is a second core free right now?"""
    import threading

    data = os.urandom(64 * 2**20)

    def work() -> None:
        for i in range(0, len(data), _BLOCK):
            hashlib.sha1(data[i:i + _BLOCK])

    t0 = time.perf_counter()
    work()
    one = time.perf_counter() - t0
    threads = [threading.Thread(target=work) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = time.perf_counter() - t0
    return {"sha1_mb_s": round(len(data) / one / 1e6),
            "two_thread_speedup": round(2 * one / two, 2),
            "loadavg": round(os.getloadavg()[0], 2)}


def run_publish_bench(
    options: PublishOptions, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every round; returns the report (see :mod:`cvmfs_ml.bench.publish_report`)."""
    content = ensure_content(options.cache_dir, options.scale)
    src = content.folder
    files = input_files(src)
    total = sum(p.stat().st_size for p in files)
    work = options.work_dir
    work.mkdir(parents=True, exist_ok=True)
    upstream = upstream_status(options.upstream_fqrn)
    log(upstream or f"upstream: cvmfs_server publishing into /cvmfs/{options.upstream_fqrn}")
    cp, read, sha1 = Samples(), Samples(), Samples()
    upstream_runs = Samples()
    publishes = {mode: Samples() for mode in options.modes}
    probe_before = machine_probe()
    for round_no in range(1, options.rounds + 1):
        cold = make_cold(src, global_drop=options.global_drop)
        run = time_cp_sync(src, work)
        cp.add(run["seconds"], {**run, "resident_before": cold})
        cold = make_cold(src, global_drop=options.global_drop)
        read.add(time_read(src), {"resident_before": cold})
        sha1.add(time_read(src, digest=hashlib.sha1), {"warm": True})
        log(f"round {round_no}: cp -r + sync {run['seconds']:.2f} s (sync {run['sync_s']:.2f} s)"
            f", read {read.seconds[-1]:.2f} s")
        if upstream is None and options.upstream_fqrn:
            make_cold(src, global_drop=options.global_drop)
            upstream_runs.add(time_upstream_publish(options.upstream_fqrn, src)["seconds"])
        for mode in options.modes:
            repo = fresh_repository(work, mode)
            cold = make_cold(src, global_drop=options.global_drop)
            result = probe_publish({"repo": str(repo), "src": str(src), "at": "/"})
            result["resident_before"] = cold
            result["loadavg"] = os.getloadavg()[0]
            if round_no == options.rounds:  # once: nothing changed, nothing is read again
                make_cold(src, global_drop=options.global_drop)
                again = probe_publish({"repo": str(repo), "src": str(src), "at": "/"})
                result["republish_unchanged"] = {k: again[k] for k in (
                    "seconds", "objects_new", "files_unchanged", "peak_rss")}
            publishes[mode].add(result["seconds"], result)
            shutil.rmtree(repo.parent.parent)
            os.sync()
            log(f"round {round_no}: {mode:<5} {result['seconds']:.2f} s "
                f"({result['seconds'] / run['seconds']:.2f}x cp -r + sync), peak RSS "
                f"{result['peak_rss'] / 2**20:.0f} MiB")
    return {
        "scale": options.scale,
        "rounds": options.rounds,
        "content": {"folder": str(src), "files": len(files), "bytes": total},
        "machine": {"cpus": os.cpu_count(), "probe_before": probe_before,
                    "probe_after": machine_probe()},
        "upstream": {"unavailable": upstream,
                     "publish": upstream_runs.to_json() if upstream_runs.seconds else None},
        "references": {"cp_r_sync": cp.to_json(), "read": read.to_json(),
                       "sha1_warm": sha1.to_json()},
        "publish": {mode: s.to_json() for mode, s in publishes.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
