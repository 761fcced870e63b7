"""Read benchmark (issue 3): how fast does a cvmfs-ml client read a 2 GiB weights file?

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
:class:`~cvmfs_ml.bench.netem.DelayProxy` in front: 20 ms RTT, handshake RTT on new
connections, no cap) and ``rtt20-cap84`` (the same plus 84 MB/s *per connection*; parallel
connections add up). The proxy runs in a thread of this driver, which only waits while a cell
runs.

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
/dev/null), ``fuse`` (``cat`` of the file on a cvmfs-ml FUSE mount, daemon started with
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

Times are medians of ``--repeats`` runs (``--cold-repeats`` for cold cells), with min and max.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_CACHE = _ROOT / "bench-out" / "cache" / "read"
_DEFAULT_WORK = _ROOT / "bench-out" / "work" / "read"
_DEFAULT_OUT = _ROOT / "bench-out" / "read.json"
_FQRN = "bench.read.local"
_WEIGHTS_BYTES = 2 * 2**30
_ONNX_BYTES = int(1.5 * 2**30)
_WEIGHTS_REL = "weights/model.safetensors"
_ONNX_REL = "onnx/model.onnx"
_RAW_REL = "raw/model.safetensors"
_CHILD_MARK = "@@BENCH_READ@@"
_RSS_GOAL_MB = 300.0

NETWORKS: dict[str, dict[str, Any] | None] = {
    "loopback": None,
    "rtt20": {"rtt_ms": 20.0},
    "rtt20-cap84": {"rtt_ms": 20.0, "rate_bytes_per_s": 84e6},
}
MODES = ("local", "curl", "fuse", "fsspec")
STATES = ("cold", "warm", "hot")

# The upstream cvmfs2 figures (seconds) for the same cells, and curl's.
UPSTREAM: dict[tuple[str, str], float] = {
    ("loopback", "cold"): 4.75,
    ("rtt20", "cold"): 11.5,
    ("rtt20-cap84", "cold"): 33.8,
    ("loopback", "warm"): 0.9,
    ("loopback", "hot"): 0.14,
}
UPSTREAM_CURL = {"loopback": 0.24, "rtt20": 0.65, "rtt20-cap84": 25.6}
UPSTREAM_LOCAL = {"cold": 0.43, "hot": 0.06}
UPSTREAM_ORT = {"local": 1.08, "cvmfs": 11.1}
GOALS_COLD = {"loopback": 1.2, "rtt20": 1.5, "rtt20-cap84": 6.0}


# --------------------------------------------------------------------------------------------
# content and repository


@dataclass(frozen=True)
class Content:
    folder: Path  # published as the repository root
    weights: Path
    onnx: Path

    @property
    def weights_bytes(self) -> int:
        return self.weights.stat().st_size


def ensure_content(cache_dir: Path, scale: float) -> Content:
    """The weights file and the ONNX model for ``scale``: generated once, then reused."""
    from cvmfs_ml.bench.generators import make_llm_onnx, make_safetensors

    weights = int(_WEIGHTS_BYTES * scale)
    onnx_bytes = int(_ONNX_BYTES * scale)
    folder = cache_dir / f"content-scale{scale:g}"
    model = folder / "model"
    content = Content(model, model / _WEIGHTS_REL, model / _ONNX_REL)
    marker = folder / ".generated.json"
    spec = {
        "weights_bytes": weights,
        "onnx_bytes": onnx_bytes,
        "weights_dtype": "float16",
        "onnx_dtype": "float32",
        "seed": 0,
    }
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return content
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    print(
        f"generating {weights / 2**30:.2f} GiB float16 safetensors + "
        f"{onnx_bytes / 2**30:.2f} GiB float32 ONNX external data into {model} ...",
        flush=True,
    )
    make_safetensors(content.weights, weights, dtype="float16")
    make_llm_onnx(content.onnx.parent, total_bytes=onnx_bytes, dtype="float32")
    os.sync()
    marker.write_text(json.dumps(spec))
    print(f"  generated in {time.perf_counter() - started:.1f} s", flush=True)
    return content


@dataclass(frozen=True)
class Published:
    srv: Path  # web root: srv/cvmfs/<fqrn>/ and srv/cvmfs/raw/
    repo_dir: Path
    public_key: Path
    raw: Path  # the plain copy curl fetches
    chunks: int
    chunk_sizes: tuple[int, int, int]  # min / median / max bytes of the weights file's chunks


def ensure_repository(work: Path, content: Content, scale: float) -> Published:
    """Publish the content (compression none, 4/8/16 MiB chunks) once; reuse it afterwards."""
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings

    base = work / f"scale{scale:g}"
    srv = base / "srv"
    repo_dir = srv / "cvmfs" / _FQRN
    key = base / "keys" / f"{_FQRN}.pub"
    raw = srv / "cvmfs" / _RAW_REL
    marker = base / ".published.json"
    spec = {
        "content": str(content.folder),
        "size": content.weights_bytes,
        "mtime": content.weights.stat().st_mtime_ns,
        "compression": "none",
        "chunks": [4, 8, 16],
    }
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        if base.exists():
            shutil.rmtree(base)
        started = time.perf_counter()
        print(f"publishing {content.folder} into {repo_dir} (compression none) ...", flush=True)
        settings = PublishSettings(
            compression=Compression.NONE,
            min_chunk_size=4 * 2**20,
            avg_chunk_size=8 * 2**20,
            max_chunk_size=16 * 2**20,
        )
        publisher = create_repository(
            srv / "cvmfs", _FQRN, keys_dir=base / "keys", settings=settings
        )
        with publisher.transaction() as txn:
            txn.add_folder(content.folder, "/")
            txn.commit()
        raw.parent.mkdir(parents=True, exist_ok=True)
        # A copy, not a hard link: the origin's page cache must not be the local file's.
        subprocess.run(["cp", "--reflink=auto", str(content.weights), str(raw)], check=True)
        os.sync()
        marker.write_text(json.dumps(spec))
        print(f"  published in {time.perf_counter() - started:.1f} s", flush=True)
    from cvmfs_ml.client.repository import Repository

    with Repository.open(repo_dir, public_key=key) as repo:
        layout = repo.layout("/" + _WEIGHTS_REL)
    sizes = sorted(p.size for p in layout.pieces)
    return Published(
        srv, repo_dir, key, raw, len(sizes), (sizes[0], sizes[len(sizes) // 2], sizes[-1])
    )


# --------------------------------------------------------------------------------------------
# origin and network


class Origin:
    """nginx (preferred) or the built-in server, serving ``srv/cvmfs/...``."""

    def __init__(self, srv: Path, prefer: str) -> None:
        from cvmfs_ml.bench.services import Nginx, available

        self.kind = "builtin"
        self._nginx: Any = None
        self._builtin: Any = None
        if prefer in ("auto", "nginx") and available("nginx"):
            self._nginx = Nginx(srv)
            self.kind = "nginx"
            self.port = self._nginx.port
        elif prefer == "nginx":
            raise SystemExit("nginx is not installed (apt-get install nginx-light)")
        else:
            from cvmfs_ml.storage.http import RepositoryServer

            self._builtin = RepositoryServer(srv / "cvmfs")
            self._builtin.start()
            self.port = self._builtin.port

    def describe(self) -> str:
        if self.kind == "nginx":
            version = subprocess.run(
                [self._nginx.binary_path, "-v"], capture_output=True, text=True, check=False
            ).stderr.strip()
            return f"nginx ({version}, sendfile, docs/nginx.conf)"
        return "cvmfs-ml RepositoryServer (built-in, sendfile)"

    def close(self) -> None:
        if self._nginx is not None:
            self._nginx.close()
        if self._builtin is not None:
            self._builtin.stop()


@contextlib.contextmanager
def network(name: str, origin_port: int) -> Iterator[tuple[int, str]]:
    """The port clients use for ``name`` and a description of the emulation."""
    spec = NETWORKS[name]
    if spec is None:
        yield origin_port, "loopback, straight to the origin"
        return
    from cvmfs_ml.bench.netem import DelayProxy

    with DelayProxy("127.0.0.1", origin_port, **spec) as proxy:
        yield proxy.port, proxy.describe()


# --------------------------------------------------------------------------------------------
# cache control


def drop(paths: list[Path], *, global_drop: bool) -> None:
    from cvmfs_ml.bench.caches import drop_page_cache

    os.sync()
    drop_page_cache([p for p in paths if p.exists()], global_drop=global_drop)


def resident(path: Path) -> float:
    """Fraction of ``path`` in the page cache (mincore), to prove a cell's state."""
    from cvmfs_ml.bench.residency import resident_fraction

    try:
        return round(float(resident_fraction(path)), 4)
    except OSError:
        return -1.0


def wipe_cache(cache: Path) -> None:
    from cvmfs_ml.bench.caches import wipe_cvmfs_ml_cache

    cache.mkdir(parents=True, exist_ok=True)
    wipe_cvmfs_ml_cache(cache)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a live process has used so far (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm(pid: int) -> int | None:
    """Peak RSS (``VmHWM``) of a live process, bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------
# samples


@dataclass
class Cell:
    network: str
    mode: str
    state: str
    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def to_json(self, size: int) -> dict[str, Any]:
        med = self.median
        return {
            "network": self.network,
            "mode": self.mode,
            "state": self.state,
            "runs": self.seconds,
            "median_s": med,
            "min_s": min(self.seconds) if self.seconds else None,
            "max_s": max(self.seconds) if self.seconds else None,
            "gb_per_s": size / med / 1e9 if med else None,
            "peak_rss_bytes": max(self.rss) if self.rss else None,
            "upstream_s": (
                UPSTREAM_CURL.get(self.network)
                if self.mode == "curl"
                else UPSTREAM_LOCAL.get(self.state)
                if self.mode == "local"
                else UPSTREAM.get((self.network, self.state))
            ),
            "details": self.extra,
        }


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# the fsspec child


_FSSPEC_CHILD = r"""
import json, os, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
from cvmfs_ml.client.fsspec import CvmfsFileSystem
fs = CvmfsFileSystem(url=args["url"], public_key=args["key"], cache=args["cache"])
repo = fs.repository()
t1 = time.perf_counter()
buf = bytearray(8 << 20)
view = memoryview(buf)
total = 0
with fs.open(args["path"], "rb") as f:
    while True:
        n = f.readinto(view)
        if not n:
            break
        total += n
t2 = time.perf_counter()
cpu = os.times()
hwm = 0
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
stats = getattr(repo.source, "stats", None)
print(args["mark"] + json.dumps({"boot_s": t1 - t0, "read_s": t2 - t1, "bytes": total,
      "peak_rss": hwm, "requests": getattr(stats, "requests", None),
      "cpu_s": cpu.user + cpu.system}))
"""


def run_fsspec(
    url: str, key: Path, cache: Path, rel: str, parallel: int | None = None
) -> dict[str, Any]:
    spec = {
        "url": url,
        "key": str(key),
        "cache": str(cache),
        "path": f"{_FQRN}/{rel}",
        "mark": _CHILD_MARK,
    }
    env = dict(os.environ)
    if parallel:
        env["CVMFS_ML_PARALLEL"] = str(parallel)  # the client configuration's knob
    out = subprocess.run(
        [sys.executable, "-c", _FSSPEC_CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    for line in out.stdout.splitlines():
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    raise RuntimeError(f"fsspec child failed ({out.returncode}):\n{out.stderr[-3000:]}")


_ORT_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import numpy as np
import onnxruntime as ort
from cvmfs_ml.bench.generators import example_inputs
t0 = time.perf_counter()
sess = ort.InferenceSession(args["model"], providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
feeds = {}
for i in sess.get_inputs():
    shape = [d if isinstance(d, int) else (1 if n == 0 else 8) for n, d in enumerate(i.shape)]
    dtype = np.float16 if "float16" in i.type else np.float32
    feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(dtype)
sess.run(None, feeds)
t2 = time.perf_counter()
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
print(args["mark"] + json.dumps({"create_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0,
                                 "peak_rss": hwm}))
"""


def run_ort(model: Path) -> dict[str, Any]:
    spec = {"model": str(model), "mark": _CHILD_MARK}
    out = subprocess.run(
        [sys.executable, "-c", _ORT_CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    raise RuntimeError(f"ORT child failed ({out.returncode}):\n{out.stderr[-3000:]}")


# --------------------------------------------------------------------------------------------
# the cells


@dataclass
class Bench:
    args: argparse.Namespace
    content: Content
    published: Published
    origin: Origin
    work: Path
    cells: list[Cell] = field(default_factory=list)
    networks_seen: dict[str, str] = field(default_factory=dict)
    origin_description: str = ""

    @property
    def cache(self) -> Path:
        return self.work / "client-cache"

    @property
    def mountpoint(self) -> Path:
        return self.work / "mnt"

    def cell(self, network_name: str, mode: str, state: str) -> Cell:
        for c in self.cells:
            if (c.network, c.mode, c.state) == (network_name, mode, state):
                return c
        c = Cell(network_name, mode, state)
        self.cells.append(c)
        return c

    def log(self, c: Cell, seconds: float, note: str = "") -> None:
        size = self.content.weights_bytes
        print(
            f"  {c.network:<12} {c.mode:<7} {c.state:<5} {seconds:7.3f} s "
            f"{size / seconds / 1e9:6.2f} GB/s {note}",
            flush=True,
        )

    def drop_origin_if_asked(self) -> None:
        if self.args.drop_origin:
            drop([self.published.repo_dir / "data", self.published.raw], global_drop=False)

    # -- local ---------------------------------------------------------------------------------
    def local(self) -> None:
        path = self.content.weights
        for state in ("cold", "hot"):
            c = self.cell("-", "local", state)
            for _ in range(self.args.repeats):
                if state == "cold":
                    drop([path], global_drop=self.args.global_drop)
                else:
                    timed(["cat", str(path)])  # make sure it is all in memory
                before = resident(path)
                t = timed(["cat", str(path)])
                c.seconds.append(t)
                c.extra.append({"resident_before": before})
                self.log(c, t, f"(resident before {before:.0%})")

    # -- curl ----------------------------------------------------------------------------------
    def curl(self, net: str, port: int) -> None:
        url = f"http://127.0.0.1:{port}/cvmfs/{_RAW_REL}"
        c = self.cell(net, "curl", "cold")
        if not self.args.drop_origin:
            timed(["cat", str(self.published.raw)])  # the origin keeps its files in memory
        repeats = (
            self.args.cold_repeats
            if NETWORKS[net] and "rate_bytes_per_s" in (NETWORKS[net] or {})
            else self.args.repeats
        )
        for _ in range(repeats):
            self.drop_origin_if_asked()
            t = timed(["curl", "-sS", "-f", "-o", "/dev/null", url])
            c.seconds.append(t)
            self.log(c, t)

    # -- FUSE ----------------------------------------------------------------------------------
    def _mount(self, port: int) -> Any:
        from cvmfs_ml.client.fuse import mount

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.args.parallel:
            kwargs["prefetch_workers"] = self.args.parallel
        return mount(
            f"http://127.0.0.1:{port}/cvmfs/{_FQRN}",
            self.mountpoint,
            public_key=self.published.public_key,
            cache=self.cache,
            log_file=self.work / "fuse.log",
            **kwargs,
        )

    def fuse(self, net: str, port: int, states: tuple[str, ...]) -> None:
        target = self.mountpoint / _WEIGHTS_REL
        cache_files = [self.cache]
        if "cold" in states:
            c = self.cell(net, "fuse", "cold")
            for _ in range(self.args.cold_repeats):
                wipe_cache(self.cache)
                drop([self.content.weights, self.cache], global_drop=self.args.global_drop)
                self.drop_origin_if_asked()
                handle = self._mount(port)
                try:
                    cpu0 = cpu_seconds(handle.pid) or 0.0
                    t = timed(["cat", str(target)])
                    rss = vm_hwm(handle.pid)
                    cpu = (cpu_seconds(handle.pid) or 0.0) - cpu0
                finally:
                    handle.unmount()
                c.seconds.append(t)
                c.rss.append(rss or 0)
                c.extra.append({"daemon_cpu_s": round(cpu, 2)})
                self.log(c, t, f"daemon CPU {cpu:.2f} s, peak RSS {(rss or 0) / 2**20:.0f} MiB")
        if not ({"warm", "hot"} & set(states)):
            return
        if not any(self.cache.glob("??/*")):  # warm needs a full cache
            handle = self._mount(port)
            try:
                timed(["cat", str(target)])
            finally:
                handle.unmount()
        warm, hot = self.cell(net, "fuse", "warm"), self.cell(net, "fuse", "hot")
        for _ in range(self.args.repeats):
            drop(cache_files, global_drop=self.args.global_drop)
            handle = self._mount(port)
            try:
                if "warm" in states:
                    cpu0 = cpu_seconds(handle.pid) or 0.0
                    t = timed(["cat", str(target)])
                    cpu = (cpu_seconds(handle.pid) or 0.0) - cpu0
                    warm.seconds.append(t)
                    warm.rss.append(vm_hwm(handle.pid) or 0)
                    warm.extra.append({"daemon_cpu_s": round(cpu, 2)})
                    self.log(warm, t, f"daemon CPU {cpu:.2f} s")
                if "hot" in states:
                    timed(["cat", str(target)])
                    t = timed(["cat", str(target)])
                    hot.seconds.append(t)
                    hot.rss.append(vm_hwm(handle.pid) or 0)
                    self.log(hot, t, f"(mount resident {resident(target):.0%})")
            finally:
                handle.unmount()

    # -- fsspec --------------------------------------------------------------------------------
    def fsspec(self, net: str, port: int, states: tuple[str, ...]) -> None:
        url = f"http://127.0.0.1:{port}/cvmfs/{_FQRN}"
        for state in states:
            c = self.cell(net, "fsspec", state)
            repeats = self.args.cold_repeats if state == "cold" else self.args.repeats
            for _ in range(repeats):
                if state == "cold":
                    wipe_cache(self.cache)
                    self.drop_origin_if_asked()
                elif not any(self.cache.glob("??/*")):
                    run_fsspec(
                        url, self.published.public_key, self.cache, _WEIGHTS_REL, self.args.parallel
                    )
                if state in ("cold", "warm"):
                    drop([self.content.weights, self.cache], global_drop=self.args.global_drop)
                else:
                    run_fsspec(
                        url, self.published.public_key, self.cache, _WEIGHTS_REL, self.args.parallel
                    )
                result = run_fsspec(
                    url, self.published.public_key, self.cache, _WEIGHTS_REL, self.args.parallel
                )
                if result["bytes"] != self.content.weights_bytes:
                    raise RuntimeError(f"fsspec read {result['bytes']} bytes")
                c.seconds.append(result["read_s"])
                c.rss.append(result["peak_rss"])
                c.extra.append(
                    {
                        "boot_s": result["boot_s"],
                        "requests": result["requests"],
                        "process_cpu_s": round(result["cpu_s"], 2),
                    }
                )
                self.log(
                    c,
                    result["read_s"],
                    f"boot {result['boot_s']:.2f} s, process CPU "
                    f"{result['cpu_s']:.2f} s, peak RSS "
                    f"{result['peak_rss'] / 2**20:.0f} MiB",
                )

    # -- ORT -----------------------------------------------------------------------------------
    def ort(self, port: int, net: str) -> None:
        onnx_dir = self.content.onnx.parent
        local = self.cell("-", "ort-local", "cold")
        for _ in range(self.args.cold_repeats):
            drop([onnx_dir], global_drop=self.args.global_drop)
            r = run_ort(self.content.onnx)
            local.seconds.append(r["total_s"])
            local.rss.append(r["peak_rss"])
            local.extra.append(r)
            print(
                f"  ort local cold: create {r['create_s']:.2f} s + run {r['run_s']:.2f} s "
                f"= {r['total_s']:.2f} s",
                flush=True,
            )
        fuse = self.cell(net, "ort-fuse", "cold")
        for _ in range(self.args.cold_repeats):
            wipe_cache(self.cache)
            drop([onnx_dir, self.cache], global_drop=self.args.global_drop)
            self.drop_origin_if_asked()
            handle = self._mount(port)
            try:
                r = run_ort(self.mountpoint / _ONNX_REL)
                r["daemon_peak_rss"] = vm_hwm(handle.pid)
            finally:
                handle.unmount()
            fuse.seconds.append(r["total_s"])
            fuse.rss.append(r["daemon_peak_rss"] or 0)
            fuse.extra.append(r)
            print(
                f"  ort fuse {net} cold: create {r['create_s']:.2f} s + run {r['run_s']:.2f} s"
                f" = {r['total_s']:.2f} s, daemon peak RSS "
                f"{(r['daemon_peak_rss'] or 0) / 2**20:.0f} MiB",
                flush=True,
            )


# --------------------------------------------------------------------------------------------
# report


def _fmt(x: float | None, unit: str = "s") -> str:
    return "–" if x is None else f"{x:.2f}{unit}" if unit != "x" else f"{x:.2f}x"


def table(doc: dict[str, Any]) -> str:
    rows = doc["cells"]
    size = doc["weights_bytes"]
    local = {r["state"]: r["median_s"] for r in rows if r["mode"] == "local"}
    lines = [
        f"{doc['weights_bytes'] / 2**30:.2f} GiB float16 file, {doc['chunks']} chunks, "
        f"origin {doc['origin']}",
        f"{'network':<12} {'mode':<9} {'state':<5} {'median':>8} {'min–max':>13} "
        f"{'GB/s':>6} {'×local':>7} {'upstream':>9} {'×upstr':>7} {'goal':>6} "
        f"{'met':>4} {'peak RSS':>9} {'client CPU':>10}",
    ]
    for r in rows:
        if r["mode"].startswith("ort"):
            continue
        med = r["median_s"]
        if med is None:
            continue
        base = local.get("cold") if r["state"] in ("cold", "warm") else local.get(r["state"])
        ratio = med / base if base else None
        up = r.get("upstream_s")
        goal = r.get("goal_s")
        rss = r.get("peak_rss_bytes")
        met = {None: "", True: "yes", False: "no"}[r.get("goal_met")]
        cpus = [
            d.get("daemon_cpu_s", d.get("process_cpu_s"))
            for d in r.get("details", [])
            if isinstance(d, dict)
        ]
        cpus = [c for c in cpus if c is not None]
        cpu = f"{statistics.median(cpus):.2f}s" if cpus else "–"
        lines.append(
            f"{r['network']:<12} {r['mode']:<9} {r['state']:<5} {med:7.2f}s "
            f"{r['min_s']:5.2f}–{r['max_s']:<5.2f}s {size / med / 1e9:6.2f} "
            f"{_fmt(ratio, 'x'):>7} {_fmt(up):>9} {_fmt(med / up if up else None, 'x'):>7} "
            f"{_fmt(goal):>6} {met:>4} {(f'{rss / 2**20:.0f} MiB' if rss else '–'):>9} "
            f"{cpu:>10}"
        )
    ort = [r for r in rows if r["mode"].startswith("ort")]
    if ort:
        lines.append("")
        lines.append("onnxruntime session + first run, 1.5 GiB float32 external data, cold:")
        base = next((r["median_s"] for r in ort if r["mode"] == "ort-local"), None)
        for r in ort:
            d = r["details"]
            create = statistics.median(x["create_s"] for x in d) if d else 0
            run = statistics.median(x["run_s"] for x in d) if d else 0
            ratio = r["median_s"] / base if base else None
            up = UPSTREAM_ORT["local" if r["mode"] == "ort-local" else "cvmfs"]
            goal = r.get("goal_s")
            lines.append(
                f"  {r['mode']:<9} {r['network']:<8} {r['median_s']:6.2f}s "
                f"({r['min_s']:.2f}–{r['max_s']:.2f}; create {create:.2f} + run {run:.2f}) "
                f"×local {_fmt(ratio, 'x')}  upstream {up:.2f}s"
                + (
                    f"  goal {goal:.2f}s met: {'yes' if r.get('goal_met') else 'no'}"
                    if goal
                    else ""
                )
            )
    lines.append("")
    lines.append(
        "×local: warm and cold against local cold, hot against local hot; client CPU: user+sys "
        "seconds of the FUSE daemon (cat excluded) or of the whole fsspec process"
    )
    rss = [r for r in rows if r.get("rss_goal_met") is not None]
    if rss:
        worst = max(r["peak_rss_bytes"] for r in rss)
        lines.append(
            f"peak RSS of the client, worst cell: {worst / 2**20:.0f} MiB "
            f"(goal < {_RSS_GOAL_MB:.0f} MB)"
        )
    return "\n".join(lines)


def annotate(doc: dict[str, Any]) -> None:
    """Add each cell's goal and whether it is met."""
    local_cold = next(
        (r["median_s"] for r in doc["cells"] if r["mode"] == "local" and r["state"] == "cold"), None
    )
    ort_local = next((r["median_s"] for r in doc["cells"] if r["mode"] == "ort-local"), None)
    for r in doc["cells"]:
        goal = None
        if r["mode"] in ("fuse", "fsspec"):
            if r["state"] == "cold":
                goal = GOALS_COLD.get(r["network"])
            elif r["state"] == "warm" and local_cold:
                goal = 1.5 * local_cold
            elif r["state"] == "hot":
                goal = UPSTREAM[("loopback", "hot")]
        elif r["mode"] == "ort-fuse" and ort_local:
            goal = 2 * ort_local
        r["goal_s"] = goal
        r["goal_met"] = None if goal is None or r["median_s"] is None else r["median_s"] <= goal
        if r["mode"] in ("fuse", "fsspec", "ort-fuse") and r.get("peak_rss_bytes"):
            r["rss_goal_met"] = r["peak_rss_bytes"] < _RSS_GOAL_MB * 2**20


# --------------------------------------------------------------------------------------------
# main


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
    origin = Origin(published.srv, args.server)
    bench = Bench(args, content, published, origin, work)
    started = time.perf_counter()
    try:
        bench.origin_description = origin.describe()
        print(
            f"origin: {bench.origin_description}; {published.chunks} chunks "
            f"(min/median/max {[s // 2**20 for s in published.chunk_sizes]} MiB)",
            flush=True,
        )
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
        "benchmark": "read (issue 3)",
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
        "fsspec": "fresh process, CvmfsFileSystem.open + readinto of an 8 MiB buffer; "
        "read_s excludes the repository boot (details.boot_s)",
        "parallel": args.parallel,
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
