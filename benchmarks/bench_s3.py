"""Publish to S3 (moto's standalone server on loopback) versus a local folder, same input.

The input is the publish benchmark's generated model (float16 safetensors + an LLM-shaped ONNX with
external data; ``--scale 0.08`` is about 300 MB, ``--scale 1`` the issue's 3.76 GB). Each publish
runs in a fresh interpreter so its own peak RSS (``VmHWM``) is measured; the page cache of the
inputs is dropped before each run (``posix_fadvise``), so both sides read cold. The S3 side
uploads through boto3 to moto (an in-memory Python server, which is itself CPU-bound on these 2
cores: the figure is a floor for a real S3 endpoint, not a ceiling).

Usage::

    python benchmarks/bench_s3.py --scale 0.08 [--compression auto] [--out bench-out/s3.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.publishbench import make_cold
from cvmfs_ml.bench.read_probe import _peak_rss
from cvmfs_ml.bench.readbench import ensure_content

_DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "bench-out" / "cache" / "publish"

_FQRN = "bench.s3.local"
_MARK = "@@BENCH_S3@@"


def child_main(spec: dict[str, Any]) -> None:
    """Create a repository (``spec['location']``), publish ``spec['src']`` once, print JSON."""
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings

    settings = PublishSettings(compression=Compression(spec["compression"]))
    publisher = create_repository(
        spec["root"], _FQRN, keys_dir=Path(spec["keys"]), settings=settings,
        s3_config=spec.get("s3"),
    )
    started = time.perf_counter()
    with publisher.transaction() as txn:
        txn.add_folder(Path(spec["src"]))
        result = txn.commit()
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = result.stats
    print(_MARK + json.dumps({
        "seconds": seconds, "bytes_in": stats.bytes_in, "objects_new": stats.objects_new,
        "bytes_stored": stats.bytes_stored, "peak_rss_mb": _peak_rss() / 2**20,
        "mb_per_s": stats.bytes_in / seconds / 1e6, "workers": max(publisher.settings.worker_count,
                                            getattr(publisher.store, "upload_workers", 0)),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }), flush=True)


def run(spec: dict[str, Any], src: Path) -> dict[str, Any]:
    make_cold(src, global_drop=False)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"publish failed:\n{proc.stdout}{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(_MARK))
    return json.loads(line[len(_MARK):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.08)
    parser.add_argument("--compression", default="auto")
    parser.add_argument("--cache", type=Path, default=_DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    from cvmfs_ml.testing import MotoS3

    src = ensure_content(args.cache, args.scale).folder
    report: dict[str, Any] = {"scale": args.scale, "compression": args.compression}
    with tempfile.TemporaryDirectory(prefix="bench-s3.") as tmp:
        work = Path(tmp)
        report["local"] = run({"root": str(work / "srv"), "keys": str(work / "keys-local"),
                               "src": str(src), "compression": args.compression}, src)
        shutil.rmtree(work / "srv")
        with MotoS3(workdir=work / "moto") as moto:
            moto.create_bucket("bench")
            s3 = {**moto.s3_params("bench"), "CVMFS_SPOOL_DIR": str(work / "spool")}
            report["s3"] = run({"root": "s3://bench/srv", "keys": str(work / "keys-s3"),
                                "src": str(src), "compression": args.compression, "s3": s3}, src)
            pid = moto.process.pid  # type: ignore[union-attr]
            with open(f"/proc/{pid}/status") as status:
                hwm = next(x for x in status if x.startswith("VmHWM:"))
            report["moto_peak_rss_mb"] = int(hwm.split()[1]) / 1024
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            report["moto_cpu_seconds"] = (int(fields[11]) + int(fields[12])) / ticks
    report["s3_over_local"] = report["s3"]["mb_per_s"] / report["local"]["mb_per_s"]
    for side in ("local", "s3"):
        row = report[side]
        print(f"{side:>5}: {row['bytes_in'] / 1e6:7.1f} MB in {row['seconds']:6.2f} s = "
              f"{row['mb_per_s']:6.1f} MB/s, peak RSS {row['peak_rss_mb']:.0f} MB, "
              f"{row['objects_new']} objects, {row['workers']} workers, "
              f"{row['cpu_seconds']:.1f} CPU s")
    print(f"S3/local rate: {report['s3_over_local']:.0%}; moto's own peak RSS "
          f"{report['moto_peak_rss_mb']:.0f} MB, CPU {report['moto_cpu_seconds']:.1f} s "
          "(startup included)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
