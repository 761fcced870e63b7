"""Registry load benchmark (issue 10): N concurrent small CID publishes through /api/v1/cids.

Starts ``cvmfs-ml registry serve`` on two fresh repositories, POSTs ``--count`` tarballs of
``--mib`` MiB of random bytes at once (one thread each, one token), polls every job until it
is published, and prints: all visible or not, time to visible (request start -> the client
sees the job published) p50/p95/max, revisions made (batching), the server's peak RSS.

Usage::

    python benchmarks/bench_registry.py                 # 50 x 1 MiB
    python benchmarks/bench_registry.py --count 10 --mib 0.25 --oras-mib 256
    python benchmarks/bench_registry.py --count 2 --mib 0.1 --oras-mib 128 --no-preingest

``--oras-mib`` pushes one file of that size ``--oras-reps`` times (new bytes each time),
each round beside a local publish of the same bytes; the ratio local / (push + publish) is
the issue's throughput goal (>= 0.5). Each round also times the ``oras`` client's own layer
digest (``client_digest_s``, before it sends a byte) and the same push to Debian's Go
docker-registry (``docker_registry_push_s``): the client's share of a push.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3

from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.registry.config import add_token, load_config, save_config
from cvmfs_ml.testing import DockerRegistry, free_port

HTTP = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=10, read=600))


def _tarball(size: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(f"payload-{seed}/data.bin")
        info.size, info.mtime = size, 1_700_000_000
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return buffer.getvalue()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _client_visible(base: str, headers: dict[str, str], root: Path, body: bytes) -> float:
    """One more CID, timed from the POST until a client reading the repositories over HTTP
    (``cvmfs-ml wait``'s code, polling every 0.1 s) finds it."""
    from cvmfs_ml.registry.wait import wait_for_cid
    from cvmfs_ml.storage.http import RepositoryServer

    with RepositoryServer(root) as web:
        urls = [f"{web.url}/cvmfs/{fqrn}" for fqrn in ("bench1.test", "bench2.test")]
        start = time.monotonic()
        answer = HTTP.request("POST", f"{base}/pubapi/publish?cid=bench/client", body=body,
                              headers=headers)  # fmt: skip
        assert answer.status == 200, answer.data
        wait_for_cid("bench/client", urls, timeout=600, interval=0.1,
                     public_key=str(root.parent / "keys"))  # fmt: skip
        return time.monotonic() - start


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _ClientDigest:
    """Times the ``oras`` client's own layer digest (``oras.utils.get_file_hash``, 4 KiB reads),
    which it computes before it sends a byte: part of every push, to any registry."""

    def __init__(self) -> None:
        import oras.utils

        self._module = oras.utils
        self._stock = oras.utils.get_file_hash
        self.seconds = 0.0
        oras.utils.get_file_hash = self._hash

    def _hash(self, path: str, algorithm: str = "sha256") -> str:
        start = time.monotonic()
        try:
            return self._stock(path, algorithm)
        finally:
            self.seconds += time.monotonic() - start

    def close(self) -> None:
        self._module.get_file_hash = self._stock


def _random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for _ in range(size // 2**20):
            out.write(os.urandom(2**20))


def _oras_push(base: str, server: int, token: str, size: int, work: Path, reps: int) -> dict:
    """``oras push`` of one ``size``-byte file until published, against a local publish of the
    same bytes; ``reps`` rounds, interleaved (a loaded machine slows both alike), each with new
    random bytes so neither side finds the other's objects."""
    import oras.client

    from cvmfs_ml.models.layout import ModelRef
    from cvmfs_ml.models.publish import publish_model

    port = int(base.rsplit(":", 1)[1])
    baseline = create_repository(work / "baseline", "baseline.test")
    client = oras.client.OrasClient(hostname=f"127.0.0.1:{port}", insecure=True)
    client.login("bench", token, hostname=f"127.0.0.1:{port}",
                 config_path=str(work / "docker-config.json"))  # fmt: skip
    digest = _ClientDigest()
    reference = None
    if shutil.which("docker-registry"):  # the same push to a Go registry: the client's share
        reference = DockerRegistry(workdir=work / "docker-registry")
        to_reference = oras.client.OrasClient(hostname=reference.host, insecure=True)

    def push(folder: Path, target: str, to: Any) -> tuple[float, float]:
        cwd = os.getcwd()
        os.chdir(folder)
        digest.seconds = 0.0
        try:
            start = time.monotonic()
            to.push(target=target, files=["weights.bin"], do_chunked=True,
                    chunk_size=16 * 2**20)  # fmt: skip
            return time.monotonic() - start, digest.seconds
        finally:
            os.chdir(cwd)

    def until_published(tag: str, start: float) -> tuple[str, float]:
        while True:
            state = json.loads(HTTP.request("GET", f"{base}/api/v1/oci/bench/big/{tag}").data)
            if state["state"] in ("published", "failed", "skipped"):
                return state["state"], time.monotonic() - start
            time.sleep(0.01)

    rounds = []
    try:
        for rep in range(1, reps + 1):
            folder = work / f"oras-model-{rep}"
            _random_file(folder / "weights.bin", size)
            start = time.monotonic()
            publish_model(baseline, folder, ModelRef("bench", "big", str(rep)))
            local_s = time.monotonic() - start
            tag = str(rep)
            cpu = _cpu_seconds(server)
            start = time.monotonic()
            pushed_s, digest_s = push(folder, f"127.0.0.1:{port}/bench/big:{tag}", client)
            state, total_s = until_published(tag, start)
            reference_s = None
            if reference is not None:  # after ours is published: the two do not overlap
                reference_s, _ = push(folder, f"{reference.host}/bench/big:{tag}", to_reference)
            rounds.append({
                "state": state, "push_s": pushed_s, "push_and_publish_s": total_s,
                "local_publish_s": local_s, "ratio_to_local": local_s / total_s,
                "client_digest_s": digest_s, "server_cpu_s": _cpu_seconds(server) - cpu,
                "docker_registry_push_s": reference_s,
            })  # fmt: skip
            print(f"oras round {rep}: local publish {local_s:.2f} s, push until published "
                  f"{total_s:.2f} s (the client's own digest {digest_s:.2f} s; the same push to "
                  f"docker-registry {reference_s or 0:.2f} s): ratio {local_s / total_s:.2f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        digest.close()
        if reference is not None:
            reference.close()
    mib = size / 2**20
    ratios = sorted(r["ratio_to_local"] for r in rounds)
    return {
        "oras_mib": mib, "rounds": rounds, "ratio_to_local_median": statistics.median(ratios),
        "ratio_to_local_min": ratios[0], "ratio_to_local_max": ratios[-1],
        "oras_mib_per_s_best": mib / min(r["push_and_publish_s"] for r in rounds),
        "local_mib_per_s_best": mib / min(r["local_publish_s"] for r in rounds),
    }  # fmt: skip


def run(count: int, size: int, work: Path, oras_bytes: int = 0, preingest: bool = True,
        reps: int = 3) -> dict:  # fmt: skip
    root = work / "srv"
    for fqrn in ("bench1.test", "bench2.test"):
        create_repository(root, fqrn)
    config = work / "registry.json"
    token = add_token(config, "bench", ["publish:*"])
    save_config(config, dataclasses.replace(load_config(config), preingest=preingest))
    port = free_port()
    log = open(work / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_ml.cli", "registry", "serve",
         "--repo", str(root / "bench1.test"), "--repo", str(root / "bench2.test"),
         "--config", str(config), "--data", str(work / "data"), "--port", str(port),
         "--poll", "0.2"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if HTTP.request("GET", f"{base}/healthz").status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start; see {work / 'server.log'}")
            time.sleep(0.1)
        bodies = [_tarball(size, i) for i in range(count)]
        barrier = threading.Barrier(count)
        headers = {"Authorization": f"Bearer {token}"}

        def publish(i: int) -> tuple[float, float, dict]:
            barrier.wait()
            start = time.monotonic()
            answer = HTTP.request("POST", f"{base}/api/v1/cids/bench/c{i}", body=bodies[i],
                                  headers=headers)  # fmt: skip
            if answer.status != 202:
                raise RuntimeError(f"c{i}: HTTP {answer.status} {answer.data[:200]!r}")
            job_id = json.loads(answer.data)["id"]
            end = time.monotonic() + 900
            while time.monotonic() < end:
                job = json.loads(HTTP.request("GET", f"{base}/api/v1/jobs/{job_id}").data)
                if job["state"] in ("published", "failed"):
                    return start, time.monotonic(), job
                time.sleep(0.05)
            raise RuntimeError(f"c{i}: not visible within 900 s")

        wall = time.monotonic()
        with ThreadPoolExecutor(count) as pool:
            results = list(pool.map(publish, range(count)))
        wall = time.monotonic() - wall
        client_s = _client_visible(base, headers, root, _tarball(size, count))
        oras_result = (
            _oras_push(base, server.pid, token, oras_bytes, work, reps) if oras_bytes else None
        )
        visible = sorted(end - start for start, end, job in results if job["state"] == "published")
        failed = [job for _, _, job in results if job["state"] != "published"]
        made: dict[str, set[int]] = {}
        for _, _, job in results:
            made.setdefault(job["repository"], set()).add(job["revision"])
        revisions = {repo: sorted(revs) for repo, revs in sorted(made.items())}
        quantile = statistics.quantiles(visible, n=20) if len(visible) > 1 else visible * 19
        return {
            "count": count, "bytes_each": size, "all_visible": not failed, "failed": len(failed),
            "time_to_visible_s": {"p50": statistics.median(visible), "p95": quantile[18],
                                  "max": visible[-1]},
            "revisions": sum(len(r) for r in revisions.values()),
            "revisions_by_repository": revisions,
            "wall_s": wall, "one_more_cid_until_a_client_reads_it_s": client_s,
            "oras": oras_result,
            "server_peak_rss_mib": _peak_rss(server.pid) / 2**20,
        }  # fmt: skip
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: temp)")
    parser.add_argument(
        "--oras-mib",
        type=int,
        default=0,
        help="also oras-push one file of this size and compare with a local publish",
    )
    parser.add_argument("--oras-reps", type=int, default=3, help="oras push rounds")
    parser.add_argument("--no-preingest", action="store_true",
                        help="publish pushed blobs only after the push (for comparison)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvmfs-ml-bench-registry.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args.count, int(args.mib * 2**20), work, args.oras_mib * 2**20,
                     preingest=not args.no_preingest, reps=args.oras_reps)  # fmt: skip
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
