"""The read benchmark: how fast does a cvmfs-ml client read a 2 GiB weights file?

``benchmarks/bench_read.py`` is its command line; this module is the benchmark itself: the
content (a float16 safetensors file and an LLM-shaped ONNX model with float32 external data,
generated once and reused), the repository it is published in (compression none, upstream's
4/8/16 MiB chunks), the origin and the emulated networks, and the cells: ``local`` (``cat`` of
the local file), ``curl`` (one GET of a plain copy: the single-stream download, body to
``/dev/null``), ``download`` (the same GET into a new local file), ``fuse``
(``cat`` on a cvmfs-ml mount), ``fsspec`` (a fresh process reading through
:class:`~cvmfs_ml.client.fsspec.CvmfsFileSystem`) and the onnxruntime cells, each in cold,
warm and hot cache states (see the script's docstring for their definitions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.origin import Origin
from cvmfs_ml.bench.read_probe import probe
from cvmfs_ml.errors import CvmfsMlError

__all__ = ["MODES", "NETWORKS", "STATES", "Bench", "Cell", "Content", "Published", "ReadOptions",
           "ensure_content", "ensure_repository", "network"]

FQRN = "bench.read.local"
_FQRN = FQRN
_WEIGHTS_BYTES = 2 * 2**30
_ONNX_BYTES = int(1.5 * 2**30)
_WEIGHTS_REL = "weights/model.safetensors"
_ONNX_REL = "onnx/model.onnx"
_RAW_REL = "raw/model.safetensors"

NETWORKS: dict[str, dict[str, Any] | None] = {
    "loopback": None,
    "rtt20": {"rtt_ms": 20.0},
    "rtt20-cap84": {"rtt_ms": 20.0, "rate_bytes_per_s": 84e6},
}
MODES = ("local", "curl", "download", "fuse", "fsspec")
STATES = ("cold", "warm", "hot")


@dataclass(frozen=True)
class ReadOptions:
    """How the cells run: repetitions, client parallelism, what "cold" drops."""

    repeats: int = 3
    cold_repeats: int = 3
    parallel: int | None = None  # prefetch workers of the client (None: the client's default)
    drop_origin: bool = False  # also drop the origin's page cache before cold runs
    global_drop: bool = False  # also write /proc/sys/vm/drop_caches (root; whole machine)


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
# network


@contextlib.contextmanager
def network(name: str, origin_port: int) -> Iterator[tuple[int, str]]:
    """The port clients use for ``name`` and a description of the emulation."""
    spec = NETWORKS[name]
    if spec is None:
        yield origin_port, "loopback, straight to the origin"
        return
    from cvmfs_ml.testing.netem import DelayProxy

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


def fetch_cpu(mountpoint: Path) -> dict[str, float] | None:
    """Where the daemon's fetch threads spent CPU (receive, hash, store), from its stats."""
    from cvmfs_ml.client.mount_control import read_mount_stats

    try:
        return read_mount_stats(mountpoint)["fetch"].get("cpu_seconds")
    except (OSError, KeyError, ValueError, CvmfsMlError):
        return None


def disk_counters(path: Path) -> tuple[int, int] | None:
    """(bytes read, milliseconds busy) so far of the block device holding ``path``.

    From ``/proc/diskstats`` (sectors read, ``io_ticks``): across a cell, how much the disk
    read and how long it had I/O in flight, which tells a disk-bound read from one that leaves
    the disk idle.
    """
    try:
        dev = os.stat(path).st_dev
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if (int(f[0]), int(f[1])) == (os.major(dev), os.minor(dev)):
                return int(f[5]) * 512, int(f[12])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_profile(mountpoint: Path) -> dict[str, float]:
    """The mount daemon's read profile now (``cvmfs-ml stats``), empty when unavailable."""
    try:
        stats = json.loads(os.getxattr(mountpoint, "user.cvmfs_ml.stats"))
    except (OSError, ValueError):
        return {}
    return dict(stats.get("read_profile") or {})


def profile_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What a cell added to a read profile (counters are cumulative per process)."""
    return {k: round(v - before.get(k, 0), 6) for k, v in after.items()
            if isinstance(v, int | float)}  # fmt: skip


def timed_with_disk(argv: list[str], path: Path) -> tuple[float, dict[str, float]]:
    """:func:`timed`, and the disk's bytes read and busy milliseconds meanwhile."""
    before = disk_counters(path)
    t = timed(argv)
    after = disk_counters(path)
    if before is None or after is None:
        return t, {}
    return t, {"disk_mib": round((after[0] - before[0]) / 2**20, 1),
               "disk_busy_s": round((after[1] - before[1]) / 1000, 3)}  # fmt: skip


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
            "details": self.extra,
        }


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# the cells


@dataclass
class Bench:
    options: ReadOptions
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
        if self.options.drop_origin:
            drop([self.published.repo_dir / "data", self.published.raw], global_drop=False)

    # -- local ---------------------------------------------------------------------------------
    def local_now(self, state: str) -> float:
        """A ``cat`` of the local file in ``state`` (cold or hot) right now: the baseline a
        warm or hot run of the same round is divided by, so a load that drifts during the
        benchmark moves both sides ("in every run", issue 14)."""
        path = self.content.weights
        if state == "cold":
            drop([path], global_drop=self.options.global_drop)
        else:
            timed(["cat", str(path)])
        return timed(["cat", str(path)])

    def local(self) -> None:
        path = self.content.weights
        for state in ("cold", "hot"):
            c = self.cell("-", "local", state)
            for _ in range(self.options.repeats):
                if state == "cold":
                    drop([path], global_drop=self.options.global_drop)
                else:
                    timed(["cat", str(path)])  # make sure it is all in memory
                before = resident(path)
                t, disk = timed_with_disk(["cat", str(path)], path)
                c.seconds.append(t)
                c.extra.append({"resident_before": before, **disk})
                self.log(c, t, f"(resident before {before:.0%})")

    # -- curl ----------------------------------------------------------------------------------
    def curl(self, net: str, port: int, *, into_file: bool = False) -> None:
        """One GET of the plain copy: body to ``/dev/null`` (``curl``), or, ``into_file``, into a
        new file on local disk (``download``), as a user downloads a model before loading it:
        the bytes then end in the page cache, as they do behind a cold read of a mount, where
        ``/dev/null`` keeps none (see :mod:`.fresh_pages`)."""
        url = f"http://127.0.0.1:{port}/cvmfs/{_RAW_REL}"
        target = self.work / "download.bin"
        c = self.cell(net, "download" if into_file else "curl", "cold")
        if not self.options.drop_origin:
            timed(["cat", str(self.published.raw)])  # the origin keeps its files in memory
        capped = "rate_bytes_per_s" in (NETWORKS[net] or {})
        for _ in range(self.options.cold_repeats if into_file or capped else self.options.repeats):
            self.drop_origin_if_asked()
            target.unlink(missing_ok=True)
            try:
                t = timed(["curl", "-sS", "-f", "-o", str(target) if into_file else "/dev/null",
                           url])  # fmt: skip
            finally:
                target.unlink(missing_ok=True)
            c.seconds.append(t)
            self.log(c, t)

    # -- FUSE ----------------------------------------------------------------------------------
    def _mount(self, port: int) -> Any:
        from cvmfs_ml.client.fuse import mount

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.options.parallel:
            kwargs["prefetch_workers"] = self.options.parallel
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
            for _ in range(self.options.cold_repeats):
                wipe_cache(self.cache)
                drop([self.content.weights, self.cache], global_drop=self.options.global_drop)
                self.drop_origin_if_asked()
                handle = self._mount(port)
                try:
                    cpu0 = cpu_seconds(handle.pid) or 0.0
                    profile0 = read_profile(self.mountpoint)
                    t = timed(["cat", str(target)])
                    rss = vm_hwm(handle.pid)
                    cpu = (cpu_seconds(handle.pid) or 0.0) - cpu0
                    phases = fetch_cpu(self.mountpoint)
                    profile = profile_delta(profile0, read_profile(self.mountpoint))
                finally:
                    handle.unmount()
                c.seconds.append(t)
                c.rss.append(rss or 0)
                c.extra.append({"daemon_cpu_s": round(cpu, 2), "fetch_cpu_s": phases,
                                "read_profile": profile})  # fmt: skip
                self.log(c, t, f"daemon CPU {cpu:.2f} s (fetch threads: {phases}), "
                         f"peak RSS {(rss or 0) / 2**20:.0f} MiB")
        if not ({"warm", "hot"} & set(states)):
            return
        if not any(self.cache.glob("??/*")):  # warm needs a full cache
            handle = self._mount(port)
            try:
                timed(["cat", str(target)])
            finally:
                handle.unmount()
        warm, hot = self.cell(net, "fuse", "warm"), self.cell(net, "fuse", "hot")
        for _ in range(self.options.repeats):
            local_cold = self.local_now("cold") if "warm" in states else None
            drop(cache_files, global_drop=self.options.global_drop)
            handle = self._mount(port)
            try:
                if "warm" in states:
                    profile0 = read_profile(self.mountpoint)
                    cpu0 = cpu_seconds(handle.pid) or 0.0
                    t, disk = timed_with_disk(["cat", str(target)], self.cache)
                    cpu = (cpu_seconds(handle.pid) or 0.0) - cpu0
                    profile = profile_delta(profile0, read_profile(self.mountpoint))
                    warm.seconds.append(t)
                    warm.rss.append(vm_hwm(handle.pid) or 0)
                    warm.extra.append({"daemon_cpu_s": round(cpu, 2), **disk,
                                       "read_profile": profile, "local_s": local_cold})  # fmt: skip
                    self.log(warm, t, f"daemon CPU {cpu:.2f} s, disk busy "
                             f"{disk.get('disk_busy_s', float('nan')):.2f} s")  # fmt: skip
                if "hot" in states:
                    local_hot = self.local_now("hot")
                    timed(["cat", str(target)])
                    profile0 = read_profile(self.mountpoint)
                    t = timed(["cat", str(target)])
                    profile = profile_delta(profile0, read_profile(self.mountpoint))
                    hot.seconds.append(t)
                    hot.rss.append(vm_hwm(handle.pid) or 0)
                    hot.extra.append({"read_profile": profile, "local_s": local_hot})
                    served = profile.get("loop_reads", 0) + profile.get("thread_reads", 0)
                    self.log(hot, t, f"(mount resident {resident(target):.0%}, "
                             f"daemon reads {served:.0f})")  # fmt: skip
            finally:
                handle.unmount()

    # -- fsspec --------------------------------------------------------------------------------
    def _fsspec(self, url: str) -> dict[str, Any]:
        env = dict(os.environ)
        if self.options.parallel:
            env["CVMFS_ML_PARALLEL"] = str(self.options.parallel)  # the client's knob
        return probe("fsspec", {"url": url, "key": str(self.published.public_key),
                                "cache": str(self.cache), "path": f"{FQRN}/{_WEIGHTS_REL}"},
                     env=env)

    def fsspec(self, net: str, port: int, states: tuple[str, ...]) -> None:
        url = f"http://127.0.0.1:{port}/cvmfs/{_FQRN}"
        for state in states:
            c = self.cell(net, "fsspec", state)
            repeats = self.options.cold_repeats if state == "cold" else self.options.repeats
            for _ in range(repeats):
                local_s = (self.local_now("cold" if state == "warm" else "hot")
                           if state in ("warm", "hot") else None)  # fmt: skip
                if state == "cold":
                    wipe_cache(self.cache)
                    self.drop_origin_if_asked()
                elif not any(self.cache.glob("??/*")):
                    self._fsspec(url)
                if state in ("cold", "warm"):
                    drop([self.content.weights, self.cache], global_drop=self.options.global_drop)
                else:
                    self._fsspec(url)
                result = self._fsspec(url)
                if result["bytes"] != self.content.weights_bytes:
                    raise RuntimeError(f"fsspec read {result['bytes']} bytes")
                c.seconds.append(result["read_s"])
                c.rss.append(result["peak_rss"])
                c.extra.append(
                    {
                        "boot_s": result["boot_s"],
                        "requests": result["requests"],
                        "process_cpu_s": round(result["cpu_s"], 2),
                        "fetch_cpu_s": result.get("fetch_cpu_s"),
                        "read_profile": result.get("read_profile", {}),
                        "local_s": local_s,
                    }
                )
                self.log(
                    c,
                    result["read_s"],
                    f"boot {result['boot_s']:.2f} s, process CPU "
                    f"{result['cpu_s']:.2f} s (fetch threads: {result.get('fetch_cpu_s')}), "
                    "peak RSS "
                    f"{result['peak_rss'] / 2**20:.0f} MiB",
                )

    # -- ORT -----------------------------------------------------------------------------------
    def ort(self, port: int, net: str) -> None:
        onnx_dir = self.content.onnx.parent
        local = self.cell("-", "ort-local", "cold")
        for _ in range(self.options.cold_repeats):
            drop([onnx_dir], global_drop=self.options.global_drop)
            r = probe("ort", {"model": str(self.content.onnx)})
            local.seconds.append(r["total_s"])
            local.rss.append(r["peak_rss"])
            local.extra.append(r)
            print(
                f"  ort local cold: create {r['create_s']:.2f} s + run {r['run_s']:.2f} s "
                f"= {r['total_s']:.2f} s",
                flush=True,
            )
        fuse = self.cell(net, "ort-fuse", "cold")
        for _ in range(self.options.cold_repeats):
            wipe_cache(self.cache)
            drop([onnx_dir, self.cache], global_drop=self.options.global_drop)
            self.drop_origin_if_asked()
            handle = self._mount(port)
            try:
                r = probe("ort", {"model": str(self.mountpoint / _ONNX_REL)})
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
