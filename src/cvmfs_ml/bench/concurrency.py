"""The concurrency experiment: N cold clients load one model at once through one Squid."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.environment import SQUID_MAX_OBJECT_MB, BenchEnvironment
from cvmfs_ml.bench.modes import (
    Endpoint,
    ModeContext,
)
from cvmfs_ml.bench.profiles import FQRN
from cvmfs_ml.bench.zoo import BuiltModel
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.testing.netem import WAN_PROFILES, DelayProxy

__all__ = ["run_concurrency"]

_MiB = 2**20


def run_concurrency(env: BenchEnvironment, model: BuiltModel, clients: int, *,
                    network: str = "loopback", timeout: float = 900.0,
                    threads: int = 1) -> dict[str, Any]:
    """N cvmfs-ml clients (processes, empty caches) load ``model`` at once through one Squid.

    Each client is a worker in the ``fsspec`` mode with its own empty cache. Reports per-client
    time to first inference and wall time, the origin's requests and bytes (its access log),
    and Squid's hit ratio (a request that joined a fetch under way counts as a hit: it caused
    no origin request).
    """
    from cvmfs_ml.bench.modes import FsspecMode
    from cvmfs_ml.testing import Nginx, Squid, available

    if not (available("nginx") and available("squid")):
        raise ConfigError("the concurrency experiment needs nginx and squid")
    nginx = Nginx(env.srv)
    proxy = DelayProxy.from_profile(network, "127.0.0.1", nginx.port).start() \
        if WAN_PROFILES.get(network) else None
    squid = Squid(cache_mem_mb=max(256, int(model.files.nbytes * 1.3 / _MiB)),
                  maximum_object_size_mb=SQUID_MAX_OBJECT_MB)
    try:
        base = f"http://127.0.0.1:{proxy.port if proxy else nginx.port}"
        endpoint = Endpoint(network, f"{base}/cvmfs/{FQRN}", FQRN, env.public_key,
                            proxy=squid.url)
        origin_before = nginx.counters()
        procs = []
        with contextlib.ExitStack() as stack:
            for i in range(clients):
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=f"c{i}.", dir=env.workdir)))
                mode = FsspecMode()
                mode.start(ModeContext(scratch, endpoint))
                spec = {
                    "model": {"name": model.name, "entry": model.files.entry,
                              "files": list(model.files.files)},
                    "runtime": model.files.runtime, "access": mode.access(model.files, scratch),
                    "inputs": model.inputs, "inference_runs": 0, "threads": threads,
                }
                (scratch / "spec.json").write_text(json.dumps(spec))
                procs.append((scratch, spec))
            started = time.perf_counter()
            running = [(scratch, subprocess.Popen(
                [sys.executable, "-m", "cvmfs_ml.bench.worker", str(scratch / "spec.json"),
                 str(scratch / "result.json")], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)) for scratch, _ in procs]
            ended: dict[int, float] = {}
            while len(ended) < len(running):  # note each client's own end time
                now = time.perf_counter()
                for i, (_scratch, p) in enumerate(running):
                    if i not in ended and (p.poll() is not None or now - started > timeout):
                        if p.poll() is None:
                            p.kill()
                            p.wait()
                        ended[i] = now - started
                time.sleep(0.01)
            walls = [ended[i] for i in range(len(running))]
            results = []
            for scratch, _p in running:
                try:
                    results.append(json.loads((scratch / "result.json").read_text()))
                except (OSError, ValueError):
                    results.append({"ok": False, "error": "no result (killed or crashed)"})
        origin = nginx.counters() - origin_before
        records = squid.records()
        data = [r for r in records if "/data/" in r.url]
        hits = sum(1 for r in data if r.answered_locally)
        ttfi = [r["first_inference_s"] for r in results if r.get("ok")]
        return {
            "clients": clients, "model": model.name, "model_bytes": model.files.nbytes,
            "network": network, "ok": all(r.get("ok") for r in results),
            "errors": [r.get("error") for r in results if not r.get("ok")],
            "wall_s": walls, "wall_s_median": statistics.median(walls),
            "wall_s_max": max(walls),
            "first_inference_s": ttfi,
            "origin_requests": origin.requests, "origin_bytes": origin.bytes,
            "proxy_requests": len(records), "proxy_data_requests": len(data),
            "proxy_bytes": sum(r.bytes for r in records),
            "hit_ratio": (hits / len(data)) if data else None,
            "origin_bytes_per_model": origin.bytes / model.files.nbytes
            if model.files.nbytes else None,
        }
    finally:
        squid.close()
        if proxy is not None:
            proxy.stop()
        nginx.close()
