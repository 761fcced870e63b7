"""KServe cold start from CVMFS (issue 12): time until the model server is ready and has answered.

One LLM-shaped float32 ONNX model (``make_llm_onnx``, weights in ``model.onnx.data``) is
published into a repository served over HTTP on loopback (optionally behind a ``DelayProxy``
adding ``--rtt-ms``), and served by the cvmfs-ml KServe model server
(:mod:`cvmfs_ml.integrations.kserve_server`) from:

* ``local``: the original folder on local disk (page cache dropped first where we may);
* ``mount-cold``: a fresh cvmfs-ml FUSE mount with an empty cache (mounted beforehand, as a node
  with /cvmfs already has it);
* ``mount-warm``: the same mount again (object cache and page cache full);
* ``initializer``: ``cvmfs-ml kserve-init`` copying through the client (no mount), then the server;
* ``stock-download``: ``kserve_storage.Storage.download_files`` over HTTP from an origin serving
  the same files through the same proxy (KServe's catch-all ``http(s)://`` path), then the server.

Each row is wall time from the start of the scenario (download included) to the first v2
answer. Usage::

    python benchmarks/bench_kserve.py --size-mib 128               # quick, loopback
    python benchmarks/bench_kserve.py --size-mib 1536 --rtt-ms 20  # the issue's 1.5 GiB case
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cvmfs_ml.bench.caches import drop_page_cache
from cvmfs_ml.bench.generators import example_inputs, make_llm_onnx
from cvmfs_ml.client.fuse import mount
from cvmfs_ml.integrations.kserve_process import running_server, v2_infer
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.storage.http import RepositoryServer
from cvmfs_ml.testing.netem import DelayProxy

FQRN = "bench.kserve.org"


def _serve_and_answer(model_dir: str | Path, inputs: dict[str, np.ndarray], env: dict[str, str],
                      log: Path) -> tuple[float, np.ndarray]:  # fmt: skip
    """Seconds until ready, and the first answer's first output."""
    with running_server(model_dir, env=env, log=log, poll_interval=0) as server:
        outputs, _ = v2_infer(server, inputs)
        return server.ready_s, next(iter(outputs.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder, kept (default: a temporary one, removed at the end)")
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = parser.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, args.work)
        return
    # Without --work the model, the repository and the client caches (three copies of the
    # model, ~3.5x its size) live only as long as the run.
    with tempfile.TemporaryDirectory(prefix="bench-kserve.") as work:
        run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    original = work / "origin" / "model"
    if not (original / "model.onnx").exists():
        make_llm_onnx(original, args.size_mib * 2**20, dtype="float32")
    inputs = example_inputs(original / "model.onnx", batch=1, seq=1)
    srv = work / "srv"
    if not (srv / FQRN).exists():
        publisher = create_repository(srv, FQRN)
        publish_model(publisher, original, ModelRef("bench", "llm", "1.0"))
    keys = work / "keys" / f"{FQRN}.pub"
    shutil.copytree(original, srv / "origin", dirs_exist_ok=True)  # the stock HTTP origin

    rows: list[dict[str, object]] = []
    with (
        RepositoryServer(srv, plain_folders=("origin",)) as http,
        DelayProxy("127.0.0.1", http.port, rtt_ms=args.rtt_ms) as proxy,
    ):
        base = f"http://127.0.0.1:{proxy.port}"
        config = work / "client.conf"
        cache_base = work / "cache"
        config.write_text(f"CVMFS_SERVER_URL={base}/cvmfs/@fqrn@\nCVMFS_HTTP_PROXY=DIRECT\n"
                          f"CVMFS_PUBLIC_KEY={keys}\nCVMFS_CACHE_BASE={cache_base}\n")  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS")}
        env["CVMFS_ML_CONFIG"] = str(config)
        expected: np.ndarray | None = None

        def timed(name: str, prepare: Callable[[], str | Path]) -> None:
            nonlocal expected
            start = time.monotonic()
            model_dir = prepare()
            prepared = time.monotonic() - start
            ready, answer = _serve_and_answer(model_dir, inputs, env, work / f"{name}.log")
            total = time.monotonic() - start
            same = expected is None or np.allclose(answer, expected, rtol=1e-5, atol=1e-5)
            expected = answer if expected is None else expected
            rows.append({"scenario": name, "prepare_s": round(prepared, 3),
                         "server_ready_s": round(ready, 3), "ready_and_first_answer_s":
                         round(total, 3), "same_output": bool(same)})  # fmt: skip
            print(
                f"{name:<15} prepare {prepared:7.2f} s  ready {ready:7.2f} s  "
                f"first answer {total:7.2f} s  same output: {same}",
                flush=True,
            )

        drop_page_cache(original)
        timed("local", lambda: original)

        point = work / "cvmfs" / FQRN
        point.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / "mount-cache", ignore_errors=True)
        t0 = time.monotonic()
        handle = mount(FQRN, point, config_files=[config], cache=work / "mount-cache",
                       log_file=work / "fuse.log")  # fmt: skip
        mount_s = time.monotonic() - t0
        try:
            version = point / "bench" / "llm" / "1.0"
            timed("mount-cold", lambda: version)
            timed("mount-warm", lambda: version)
        finally:
            handle.unmount()

        def initializer() -> Path:
            dest = work / "init-dest"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(cache_base, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", "kserve-init", "--copy",
                            f"cvmfs://{FQRN}/bench/llm:1.0", str(dest)],
                           env=env, check=True)  # fmt: skip
            return dest

        def stock() -> Path:
            dest = work / "stock-dest"
            shutil.rmtree(dest, ignore_errors=True)
            uris = [f"{base}/cvmfs/origin/{p.name}" for p in sorted(original.iterdir())]
            subprocess.run([sys.executable, "-m", "cvmfs_ml.integrations.kserve_stock", str(dest),
                            *uris], env=env, check=True)  # fmt: skip
            return dest

        timed("initializer", initializer)
        timed("stock-download", stock)

    result = {"size_mib": args.size_mib, "rtt_ms": args.rtt_ms, "mount_s": round(mount_s, 3),
              "rows": rows}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
