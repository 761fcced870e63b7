"""Publish benchmark (issue 2): how fast does ``cvmfs-ml`` turn model files into a repository?

Content: one float16 safetensors file (2 GiB of N(0, 0.02) weights) and one LLM-shaped ONNX model
with 1.5 GiB of float16 external data, generated once into a cache folder (``--scale`` shrinks
both for a quick run). For each compression setting (``none``, ``auto``, ``zlib``, ``isal``) a
fresh repository is created and the folder is published **in a subprocess**, so the publisher's
own peak RSS (``VmHWM`` of the child; not ``ru_maxrss``, which ``vfork`` + ``exec`` inflate with
the driver's RSS) and CPU time are measured, not this driver's. Then the unchanged folder is
published again, once to the same path (nothing changes: no new data objects expected) and once
to another path (same content, new catalog entries).

The page cache of the inputs is dropped (``posix_fadvise(DONTNEED)`` per file, and the global
``drop_caches`` with ``--global-drop`` as root) before every timed run, and the residency
after the drop is recorded, so each row says whether its inputs were cold or warm. After every
run ``sync`` is called (untimed) so that dirty pages of one run do not slow the next.

References measured in the same run, on the same inputs, also cold: ``cp -r`` to a new folder
on the same disk (the local-disk floor for "read everything, write everything"), a plain read,
and sha1 of every input byte (one thread). The publish rows are reported as ratios of these.

``--stages`` adds a per-stage breakdown of each first publish (wall and thread-CPU seconds the
reading thread spends reading, chunking, slicing and waiting for a free worker slot; the same
for workers compressing, hashing and writing), measured by wrapping the pipeline's methods in
the child process. On a shared machine the CPU column is the one that carries over.
``--profile`` runs the ``none`` publish under py-spy (``pip install py-spy``) and prints the
costliest frames per thread.

Usage::

    python benchmarks/bench_publish.py --scale 0.1            # quick check (~380 MB)
    python benchmarks/bench_publish.py                        # the issue's sizes (3.76 GB)
    python benchmarks/bench_publish.py --only none --stages --profile
    python benchmarks/bench_publish.py --show bench-out/publish.json   # re-print a run

MB/s are 10^6 bytes of *input* per second of the publish (transaction start to manifest swap,
measured inside the child; the process wall time including interpreter start is also kept).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_CACHE = _ROOT / "bench-out" / "cache" / "publish"
_DEFAULT_WORK = _ROOT / "bench-out" / "work" / "publish"
_DEFAULT_OUT = _ROOT / "bench-out" / "publish.json"
_COMPRESSIONS = ("none", "auto", "zlib", "isal")
_WEIGHTS_BYTES = 2 * 2**30
_ONNX_BYTES = int(1.5 * 2**30)
_FQRN = "bench.publish.local"
_CHILD_MARK = "@@BENCH_PUBLISH@@"
_BLOCK = 8 * 2**20
_UPSTREAM = {"none": 336.0, "zlib": 65.0}  # MB/s, cvmfs_server publish of the same content
_GOALS = {"none": 600.0, "auto": 600.0, "isal": 150.0}  # MB/s (issue 2)
_RSS_GOAL_MB = 300.0


# --------------------------------------------------------------------------------------------
# content


def ensure_content(cache_dir: Path, scale: float) -> Path:
    """The input folder for ``scale``; generated once, reused while its marker matches."""
    from cvmfs_ml.bench.generators import make_llm_onnx, make_safetensors

    weights = int(_WEIGHTS_BYTES * scale)
    onnx_bytes = int(_ONNX_BYTES * scale)
    folder = cache_dir / f"content-scale{scale:g}"
    marker = folder / ".generated.json"
    spec = {"weights_bytes": weights, "onnx_bytes": onnx_bytes, "dtype": "float16", "seed": 0}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder / "model"
    if folder.exists():
        shutil.rmtree(folder)
    model = folder / "model"
    started = time.perf_counter()
    print(f"generating {weights / 2**30:.2f} GiB safetensors + {onnx_bytes / 2**30:.2f} GiB ONNX "
          f"external data into {model} ...", flush=True)
    make_safetensors(model / "weights" / "model.safetensors", weights, dtype="float16")
    make_llm_onnx(model / "onnx", total_bytes=onnx_bytes, dtype="float16")
    os.sync()
    marker.write_text(json.dumps(spec))
    print(f"  generated in {time.perf_counter() - started:.1f} s", flush=True)
    return model


def input_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def make_cold(folder: Path, *, global_drop: bool) -> dict[str, Any]:
    """Drop the inputs' page cache; return how much of them is still resident afterwards."""
    from cvmfs_ml.bench.caches import drop_page_cache
    from cvmfs_ml.bench.residency import resident_fraction

    os.sync()
    result = drop_page_cache(folder, global_drop=global_drop)
    files = input_files(folder)
    total = sum(p.stat().st_size for p in files)
    resident = sum(resident_fraction(p) * p.stat().st_size for p in files)
    fraction = resident / total if total else 0.0
    return {
        "files_advised": result.files,
        "global_drop": result.global_dropped,
        "resident_fraction": round(fraction, 4),
        "state": "cold" if fraction < 0.05 else ("warm" if fraction > 0.95 else "partial"),
    }


# --------------------------------------------------------------------------------------------
# the child process: one publish


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class _Timers:
    """Wall and thread-CPU seconds per stage, summed; cheap enough to wrap per-block calls.

    CPU time (``CLOCK_THREAD_CPUTIME_ID``, user + sys of the calling thread) is what a stage
    costs; wall time also counts waiting for the CPU, the disk or the GIL. On a shared machine
    the two differ a lot, and the CPU figures are the ones that transfer to an idle machine.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def add(self, name: str, start: tuple[float, float]) -> None:
        wall, cpu = _clocks()
        with self.lock:
            self.seconds[name] += wall - start[0]
            self.cpu[name] += cpu - start[1]
            self.calls[name] += 1

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = _clocks()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, start)

        setattr(owner, attr, timed)


def _install_stage_timers(timers: _Timers) -> None:
    """Wrap the pipeline's stages (reading thread and workers) with timers, in this process."""
    from cvmfs_ml.cvmfs import chunking
    from cvmfs_ml.publish import ingest, sources
    from cvmfs_ml.storage import local

    # reading thread
    timers.wrap(chunking.Xor32Chunker, "feed", "reader.chunker_feed")
    timers.wrap(ingest.ContentPipeline, "_add_chunked", "reader.add_chunked_total")
    timers.wrap(ingest.ContentPipeline, "_add_whole", "reader.add_whole_total")
    timers.wrap(ingest.ContentPipeline, "_decide", "reader.auto_decide")
    timers.wrap(ingest.ContentPipeline, "close", "reader.final_wait_for_workers")

    class _TimedFile:
        def __init__(self, raw: Any) -> None:
            self._raw = raw

        def read(self, *args: Any) -> bytes:
            start = _clocks()
            data = self._raw.read(*args)
            timers.add("reader.file_read", start)
            return data

        def __enter__(self) -> _TimedFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._raw.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._raw, name)

    original_opener = sources._opener
    sources._opener = lambda path: (lambda: _TimedFile(original_opener(path)()))  # type: ignore[assignment]

    class _TimedSemaphore:
        def __init__(self, inner: threading.BoundedSemaphore) -> None:
            self._inner = inner

        def acquire(self, *args: Any, **kwargs: Any) -> bool:
            start = _clocks()
            got = self._inner.acquire(*args, **kwargs)
            timers.add("reader.wait_for_free_slot", start)
            return got

        def release(self) -> None:
            self._inner.release()

    original_init = ingest.ContentPipeline.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._slots = _TimedSemaphore(self._slots)

    ingest.ContentPipeline.__init__ = init  # type: ignore[method-assign]

    # workers
    timers.wrap(ingest.ContentPipeline, "_piece_task", "worker.piece_total")
    timers.wrap(ingest.ContentPipeline, "_store", "worker.store_total")
    timers.wrap(local.LocalStore, "exists", "worker.exists")
    timers.wrap(local.LocalStore, "put_bytes", "worker.put_bytes")
    original_new_hasher = ingest.new_hasher

    class _TimedHasher:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def update(self, data: Any) -> None:
            start = _clocks()
            self._inner.update(data)
            timers.add("worker.hash", start)

        def digest(self) -> bytes:
            return self._inner.digest()

    ingest.new_hasher = lambda algorithm: _TimedHasher(original_new_hasher(algorithm))  # type: ignore[assignment]

    # after the content: catalogs, history, signing
    from cvmfs_ml.publish import workspace

    timers.wrap(workspace.CatalogWorkspace, "commit", "after.catalog_commit")
    from cvmfs_ml.publish import repository

    timers.wrap(repository.Publisher, "_write_history", "after.history")
    timers.wrap(repository.Publisher, "_sign_and_swap", "after.sign_and_swap")


def _vm_hwm_kib() -> int:
    """Peak RSS of this process's address space (``VmHWM``).

    Not ``ru_maxrss``: Python's subprocess uses ``vfork``, and ``execve`` folds the *parent's*
    high-water mark into the child's ``ru_maxrss``, so a child can report the driver's RSS.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_main(spec: dict[str, Any]) -> None:
    """Publish ``spec['src']`` at ``spec['at']`` into ``spec['repo']``; print one JSON line."""
    t_start = time.perf_counter()
    timers = _Timers() if spec.get("stages") else None
    from cvmfs_ml.publish.repository import Publisher

    if timers is not None:
        _install_stage_timers(timers)
    rss_after_import = _vm_hwm_kib()
    publisher = Publisher.open(Path(spec["repo"]))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with publisher.transaction() as txn:
        txn.add_folder(Path(spec["src"]), spec["at"])
        result = txn.commit()
    t1 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = result.stats
    out = {
        "seconds": t1 - t0,
        "commit_seconds": result.seconds,
        "process_seconds_before_publish": t0 - t_start,
        "revision": result.revision,
        "files": stats.files,
        "bytes_in": stats.bytes_in,
        "objects_new": stats.objects_new,
        "objects_existing": stats.objects_existing,
        "bytes_stored_new": stats.bytes_stored,
        "maxrss_kib": _vm_hwm_kib(),
        "maxrss_after_import_kib": rss_after_import,
        "ru_maxrss_kib": usage.ru_maxrss,  # inflated by the parent's RSS (vfork + exec)
        "cpu_user": usage.ru_utime - cpu0.ru_utime,
        "cpu_sys": usage.ru_stime - cpu0.ru_stime,
        "workers": publisher.settings.worker_count,
    }
    if timers is not None:
        out["stages"] = {k: round(v, 4) for k, v in sorted(timers.seconds.items())}
        out["stages_cpu"] = {k: round(v, 4) for k, v in sorted(timers.cpu.items())}
        out["stage_calls"] = dict(sorted(timers.calls.items()))
    print(_CHILD_MARK + json.dumps(out), flush=True)


def run_child(spec: dict[str, Any], *, wrapper: list[str] | None = None) -> dict[str, Any]:
    """Run one publish in a fresh interpreter; returns the child's JSON plus the process wall."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if wrapper:
        cmd = [*wrapper, *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU only: see _vm_hwm_kib
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"publish child failed ({proc.returncode}): {' '.join(cmd[:4])} ...")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(_CHILD_MARK))
    out = json.loads(line[len(_CHILD_MARK):])
    out["process_wall"] = wall
    out["children_cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.stderr.strip():
        out["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
    return out


# --------------------------------------------------------------------------------------------
# repositories


def data_usage(repo: Path) -> tuple[int, int]:
    """(object files, bytes) under ``repo/data`` excluding the staging folder."""
    count = size = 0
    data = repo / "data"
    for bucket in os.scandir(data):
        if len(bucket.name) != 2 or not bucket.is_dir():
            continue
        for entry in os.scandir(bucket.path):
            count += 1
            size += entry.stat(follow_symlinks=False).st_size
    return count, size


def fresh_repository(work: Path, compression: str) -> Path:
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings

    base = work / compression
    if base.exists():
        shutil.rmtree(base)
    root = base / "srv"
    root.mkdir(parents=True)
    settings = PublishSettings(compression=Compression(compression))
    create_repository(root, _FQRN, keys_dir=base / "keys", settings=settings)
    return root / _FQRN


def timed_publish(repo: Path, src: Path, at: str, *, global_drop: bool, stages: bool = False,
                  wrapper: list[str] | None = None) -> dict[str, Any]:
    inputs = make_cold(src, global_drop=global_drop)
    objects0, bytes0 = data_usage(repo)
    out = run_child({"repo": str(repo), "src": str(src), "at": at, "stages": stages},
                    wrapper=wrapper)
    t0 = time.perf_counter()
    os.sync()
    out["sync_after_seconds"] = time.perf_counter() - t0
    objects1, bytes1 = data_usage(repo)
    out["data_files_new"] = objects1 - objects0  # every object kind: catalogs, history, ...
    out["data_bytes_new"] = bytes1 - bytes0
    out["inputs"] = inputs
    out["loadavg_before"] = os.getloadavg()
    out["mb_s"] = out["bytes_in"] / out["seconds"] / 1e6
    return out


# --------------------------------------------------------------------------------------------
# references


def ref_copy(src: Path, work: Path, *, global_drop: bool) -> dict[str, Any]:
    dst = work / "cp-copy"
    if dst.exists():
        shutil.rmtree(dst)
    inputs = make_cold(src, global_drop=global_drop)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    t1 = time.perf_counter()
    os.sync()
    sync_seconds = time.perf_counter() - t1
    shutil.rmtree(dst)
    return {"seconds": seconds, "cpu": cpu, "sync_after_seconds": sync_seconds, "inputs": inputs}


def ref_read(src: Path, *, global_drop: bool, sha1: bool) -> dict[str, Any]:
    inputs = make_cold(src, global_drop=global_drop)
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    hasher = hashlib.sha1() if sha1 else None
    t0 = time.perf_counter()
    total = 0
    for path in input_files(src):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
                if hasher is not None:
                    hasher.update(view[:n])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": total, "inputs": inputs}


def ref_codecs(src: Path) -> dict[str, Any]:
    """Single-thread MB/s of the per-chunk work on a 64 MiB sample of the weights (warm)."""
    import zlib

    from isal import isal_zlib

    from cvmfs_ml.cvmfs.chunking import ChunkParams, Xor32Chunker

    weights = next(p for p in input_files(src) if p.suffix == ".safetensors")
    with open(weights, "rb") as f:
        sample = f.read(64 * 2**20)
    pieces = [sample[i:i + _BLOCK] for i in range(0, len(sample), _BLOCK)]
    out: dict[str, Any] = {"sample_bytes": len(sample)}

    def rate(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return len(sample) / (time.perf_counter() - t0) / 1e6

    out["sha1_mb_s"] = rate(lambda: [hashlib.sha1(p).digest() for p in pieces])
    out["zlib6_mb_s"] = rate(lambda: [zlib.compress(p, 6) for p in pieces])
    out["isal1_mb_s"] = rate(lambda: [isal_zlib.compress(p, 1) for p in pieces])
    out["zlib6_ratio"] = len(sample) / sum(len(zlib.compress(p, 6)) for p in pieces)
    out["isal1_ratio"] = len(sample) / sum(len(isal_zlib.compress(p, 1)) for p in pieces)

    def chunk() -> None:
        chunker = Xor32Chunker(ChunkParams())
        for p in pieces:
            chunker.feed(p)

    out["chunker_feed_mb_s"] = rate(chunk)

    def slicing() -> None:  # what the reading thread does with each block besides feed
        buffer = bytearray()
        for p in pieces:
            buffer += p
            piece = bytes(buffer[: len(p)])
            del buffer[: len(p)]
            del piece

    out["buffer_slicing_mb_s"] = rate(slicing)
    return out


def two_core_probe() -> dict[str, float]:
    """sha1 of 64 MiB on one thread vs two threads: is the second vCPU there right now?"""
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
    return {"speedup_two_threads": round(2 * one / two, 2), "loadavg": os.getloadavg()[0]}


# --------------------------------------------------------------------------------------------
# profiling (py-spy)


def summarize_speedscope(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per thread from a py-spy speedscope file."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]

    def name(i: int) -> str:
        f = frames[i]
        file = Path(f.get("file", "?")).name
        return f"{f['name']} ({file}:{f.get('line', '?')})"

    threads = {}
    for profile in doc["profiles"]:
        samples = profile["samples"]
        weights = profile.get("weights") or [1] * len(samples)
        total = sum(weights)
        if not total:
            continue
        self_w: collections.Counter[int] = collections.Counter()
        incl_w: collections.Counter[int] = collections.Counter()
        for stack, w in zip(samples, weights, strict=True):
            if stack:
                self_w[stack[-1]] += w
            for f in set(stack):
                incl_w[f] += w
        threads[profile["name"]] = {
            "seconds": total,  # py-spy speedscope weights are seconds
            "self": [(name(f), round(w / total, 3)) for f, w in self_w.most_common(top)],
            "inclusive": [(name(f), round(w / total, 3)) for f, w in incl_w.most_common(top)],
        }
    return threads


def run_profile(src: Path, work: Path, out_dir: Path, *, global_drop: bool,
                rate: int) -> dict[str, Any]:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    repo = fresh_repository(work, "none")
    target = out_dir / "publish-none.speedscope.json"
    wrapper = [pyspy, "record", "--threads", "--idle", "--rate", str(rate), "--format",
               "speedscope", "--output", str(target), "--"]
    run = timed_publish(repo, src, "/", global_drop=global_drop, wrapper=wrapper)
    summary = summarize_speedscope(target)
    shutil.rmtree(repo.parent.parent)
    return {"run": run, "speedscope": str(target), "threads": summary}


# --------------------------------------------------------------------------------------------
# driver


def bench_compression(compression: str, src: Path, work: Path, *, global_drop: bool,
                      stages: bool, keep: bool) -> dict[str, Any]:
    repo = fresh_repository(work, compression)
    print(f"[{compression}] first publish ...", flush=True)
    first = timed_publish(repo, src, "/", global_drop=global_drop, stages=stages)
    print(f"[{compression}]   {first['mb_s']:.0f} MB/s, {first['seconds']:.1f} s, "
          f"peak RSS {first['maxrss_kib'] / 1024:.0f} MiB, {first['objects_new']} new objects",
          flush=True)
    same = timed_publish(repo, src, "/", global_drop=global_drop)
    print(f"[{compression}]   re-publish same path: {same['seconds']:.1f} s, "
          f"{same['objects_new']} new data objects, {same['data_files_new']} new files",
          flush=True)
    other = timed_publish(repo, src, "/copy", global_drop=global_drop)
    print(f"[{compression}]   re-publish to /copy: {other['seconds']:.1f} s, "
          f"{other['objects_new']} new data objects, {other['data_files_new']} new files",
          flush=True)
    result = {"compression": compression, "first": first, "republish_same_path": same,
              "republish_other_path": other}
    if not keep:
        shutil.rmtree(repo.parent.parent)
    return result


def print_table(report: dict[str, Any]) -> None:
    refs = report["references"]
    total = report["content"]["bytes"]
    cp_s, sha_s = refs["cp_r"]["seconds"], refs["sha1"]["seconds"]
    read_s = refs["read"]["seconds"]
    print()
    print(f"input: {total / 1e9:.2f} GB in {report['content']['files']} files "
          f"(scale {report['scale']:g}); MB = 10^6 bytes of input per second; "
          f"{report['machine']['cpus']} CPUs")
    print(f"references (cold inputs): cp -r {total / cp_s / 1e6:.0f} MB/s ({cp_s:.2f} s, "
          f"{refs['cp_r'].get('cpu', 0.0):.1f} CPU s), "
          f"read {total / read_s / 1e6:.0f} MB/s, sha1 (1 thread) {total / sha_s / 1e6:.0f} MB/s")
    head = (f"{'compression':<11} {'inputs':<6} {'MB/s':>6} {'s':>7} {'xcp':>5} {'xsha1':>5} "
            f"{'RSS MiB':>7} {'cpu s':>6} {'stored MB':>9} {'in/st':>6} {'new obj':>7} {'dup':>4} "
            f"{'| same: s':>9} {'t/t0':>5} {'new':>4} {'| /copy: s':>10} {'t/t0':>5} {'new':>4}")
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        f, s, o = row["first"], row["republish_same_path"], row["republish_other_path"]
        stored = f["bytes_stored_new"]
        print(f"{row['compression']:<11} {f['inputs']['state']:<6} {f['mb_s']:>6.0f} "
              f"{f['seconds']:>7.2f} {f['seconds'] / cp_s:>5.2f} {f['seconds'] / sha_s:>5.2f} "
              f"{f['maxrss_kib'] / 1024:>7.0f} {f['cpu_user'] + f['cpu_sys']:>6.1f} "
              f"{stored / 1e6:>9.0f} {f['bytes_in'] / stored if stored else 0:>6.3f} "
              f"{f['objects_new']:>7} {f['objects_existing']:>4} "
              f"{s['seconds']:>9.2f} {s['seconds'] / f['seconds']:>5.2f} "
              f"{s['objects_new']:>4} {o['seconds']:>10.2f} {o['seconds'] / f['seconds']:>5.2f} "
              f"{o['objects_new']:>4}")
    print("xcp / xsha1: publish time / cp -r or sha1 time (1.0 = as fast as that floor). "
          "in/st: input bytes / new stored bytes (compression and dedup). dup: chunks already "
          "stored (identical content). 'new' = new data objects (catalogs etc. not counted; "
          "see data_files_new in JSON).")
    for row in report["results"]:
        c, mb_s = row["compression"], row["first"]["mb_s"]
        notes = []
        if c in _GOALS:
            met = "met" if mb_s >= _GOALS[c] else "NOT met"
            notes.append(f"goal >= {_GOALS[c]:.0f} MB/s: {met}")
        if c in _UPSTREAM:
            notes.append(f"upstream {_UPSTREAM[c]:.0f} MB/s -> x{mb_s / _UPSTREAM[c]:.2f}")
        rss_mb = row["first"]["maxrss_kib"] * 1024 / 1e6
        met = "met" if rss_mb < _RSS_GOAL_MB else "NOT met"
        notes.append(f"RSS < {_RSS_GOAL_MB:.0f} MB: {met}")
        ratio = row["republish_same_path"]["seconds"] / row["first"]["seconds"]
        notes.append(f"re-publish < 0.1x: {'met' if ratio < 0.1 else 'NOT met'}")
        print(f"  {c}: " + "; ".join(notes))


def print_stages(compression: str, run: dict[str, Any]) -> None:
    """Wall and CPU seconds per stage of one publish, and what limits it."""
    wall, cpu = run["stages"], run.get("stages_cpu", {})
    seconds, workers, gb = run["seconds"], run["workers"], run["bytes_in"] / 1e9
    print(f"\nstages of the '{compression}' publish ({seconds:.2f} s wall, {workers} workers, "
          f"process CPU {run['cpu_user'] + run['cpu_sys']:.1f} s):")
    print(f"  {'stage':<34} {'wall s':>7} {'% wall':>7} {'CPU s':>7} {'CPU s/GB':>8}")

    def line(name: str, w: float, c: float | None, share: float) -> None:
        cpu_text = f"{c:7.2f} {c / gb:8.2f}" if c is not None else f"{'':7} {'':8}"
        print(f"  {name:<34} {w:7.2f} {share:7.1%} {cpu_text}")

    reader = ("reader.file_read", "reader.chunker_feed", "reader.wait_for_free_slot",
              "reader.auto_decide", "reader.final_wait_for_workers")
    total_w = wall.get("reader.add_chunked_total", 0.0) + wall.get("reader.add_whole_total", 0.0)
    total_c = cpu.get("reader.add_chunked_total", 0.0) + cpu.get("reader.add_whole_total", 0.0)
    for k in reader:
        line(k, wall.get(k, 0.0), cpu.get(k) if cpu else None, wall.get(k, 0.0) / seconds)
    rest_w = total_w - sum(wall.get(k, 0.0) for k in reader[:4])
    rest_c = total_c - sum(cpu.get(k, 0.0) for k in reader[:4]) if cpu else None
    line("reader.slicing_and_rest (1)", rest_w, rest_c, rest_w / seconds)
    line("reader thread, all", total_w, total_c if cpu else None, total_w / seconds)
    busy = wall.get("worker.piece_total", 0.0)
    line("workers, all (2)", busy, cpu.get("worker.piece_total") if cpu else None,
         busy / (seconds * workers))
    for k in ("worker.hash", "worker.exists", "worker.put_bytes"):
        line("  " + k, wall.get(k, 0.0), cpu.get(k) if cpu else None, wall.get(k, 0.0) / seconds)
    comp_w = busy - wall.get("worker.store_total", 0.0)
    comp_c = cpu.get("worker.piece_total", 0.0) - cpu.get("worker.store_total", 0.0)
    line("  worker.compress (3)", comp_w, comp_c if cpu else None, comp_w / seconds)
    for k in ("after.catalog_commit", "after.history", "after.sign_and_swap"):
        line(k, wall.get(k, 0.0), cpu.get(k) if cpu else None, wall.get(k, 0.0) / seconds)
    print("  (1) add_* total minus the stages above: bytearray append/slice/del, bytes copies, "
          "submit. (2) % of workers x wall. (3) piece total minus store total.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the content sizes (2 GiB + 1.5 GiB) by this")
    parser.add_argument("--cache-dir", type=Path, default=_DEFAULT_CACHE)
    parser.add_argument("--work-dir", type=Path, default=_DEFAULT_WORK,
                        help="repositories and the cp -r copy (keep it on the inputs' disk)")
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
    parser.add_argument("--only", nargs="+", choices=_COMPRESSIONS, default=list(_COMPRESSIONS))
    parser.add_argument("--global-drop", action="store_true",
                        help="also echo 1 > /proc/sys/vm/drop_caches (root; hits the machine)")
    parser.add_argument("--stages", action="store_true",
                        help="time the pipeline's stages in each first publish")
    parser.add_argument("--profile", action="store_true",
                        help="an extra 'none' publish under py-spy (pip install py-spy)")
    parser.add_argument("--profile-rate", type=int, default=250)
    parser.add_argument("--keep", action="store_true", help="keep the repositories")
    parser.add_argument("--show", type=Path, metavar="JSON",
                        help="print the tables of an earlier run's JSON and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.show:
        show(json.loads(args.show.read_text()))
        return 0

    src = ensure_content(args.cache_dir, args.scale)
    files = input_files(src)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "scale": args.scale,
        "content": {"folder": str(src), "files": len(files),
                    "bytes": sum(p.stat().st_size for p in files),
                    "sizes": {str(p.relative_to(src)): p.stat().st_size for p in files}},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "probe_before": two_core_probe()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print("references ...", flush=True)
    report["references"] = {
        "cp_r": ref_copy(src, work, global_drop=args.global_drop),
        "read": ref_read(src, global_drop=args.global_drop, sha1=False),
        "sha1": ref_read(src, global_drop=args.global_drop, sha1=True),
        "codecs_1_thread": ref_codecs(src),
    }
    results = []
    for compression in args.only:
        results.append(bench_compression(
            compression, src, work, global_drop=args.global_drop,
            stages=args.stages, keep=args.keep))
    report["results"] = results
    if args.profile:
        print("profiling the 'none' publish under py-spy ...", flush=True)
        report["profile"] = run_profile(src, work, args.out.parent, global_drop=args.global_drop,
                                        rate=args.profile_rate)
    report["machine"]["probe_after"] = two_core_probe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    show(report)
    print(f"JSON: {args.out}")
    return 0


def show(report: dict[str, Any]) -> None:
    """Print the table, the stage breakdowns and the profile summary of one run."""
    results = report["results"]
    print_table(report)
    for row in results:
        if "stages" in row["first"]:
            print_stages(row["compression"], row["first"])
    if "profile" in report:
        print(f"\npy-spy profile of a 'none' publish: {report['profile']['speedscope']}")
        for thread, info in report["profile"]["threads"].items():
            print(f"  {thread} ({info['seconds']:.1f} s sampled), top self (share of wall):")
            for frame, share in info["self"][:8]:
                print(f"    {share:6.1%}  {frame}")
    probe = report["machine"]
    print(f"\nmachine probe (sha1, two threads vs one; 2.0 = both vCPUs free): "
          f"{probe['probe_before']['speedup_two_threads']} before (load "
          f"{probe['probe_before']['loadavg']:.1f}), {probe['probe_after']['speedup_two_threads']} "
          f"after (load {probe['probe_after']['loadavg']:.1f})")


if __name__ == "__main__":
    sys.exit(main())
