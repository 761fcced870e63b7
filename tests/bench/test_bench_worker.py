"""The measurement worker: every access kind and runtime gives the same output, with metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cvmfs_ml.bench.environment import BenchEnvironment, run_worker
from cvmfs_ml.bench.profiles import FQRN
from cvmfs_ml.bench.residency import PAGE_SIZE
from cvmfs_ml.bench.worker import run_spec
from cvmfs_ml.bench.zoo import BuiltModel


def _spec(model: BuiltModel, access: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": {"name": model.name, "entry": model.files.entry,
                      "files": list(model.files.files)},
            "runtime": model.files.runtime, "access": access, "inputs": model.inputs,
            "inference_runs": 3, "threads": 1, **extra}


def _cvmfs_access(env: BenchEnvironment, model: BuiltModel, cache: Path,
                  client: str) -> dict[str, Any]:
    ep = env.endpoint("loopback")
    return {"kind": "cvmfs", "client": client, "root": f"/{model.name}", "url": ep.repo_url,
            "fqrn": FQRN, "public_key": str(ep.public_key), "cache": str(cache),
            "storage_options": {"url": ep.repo_url, "public_key": str(ep.public_key),
                                "cache": str(cache)}}


def test_local_path_run_has_all_metrics(bench_env: BenchEnvironment, tmp_path: Path) -> None:
    model = bench_env.models["llm-4m"]
    res_out = tmp_path / "res.npz"
    result = run_spec(_spec(model, {"kind": "path", "root": str(model.files.folder)},
                            residency=True, residency_out=str(res_out)))
    assert 0 < result["open_s"] <= result["first_inference_s"]
    assert result["first_run_s"] > 0 and len(result["latencies_s"]) == 3
    assert len(result["output_sha256"]) == 64
    assert result["peak_rss_bytes"] > 10 * 2**20
    assert result["post_resident_fraction"] > 0.9  # onnxruntime touched every weight
    with np.load(res_out) as saved:
        data_file = model.files.folder / "model.onnx.data"
        pages = int(saved["__pages__model.onnx.data"])
        assert pages == -(-data_file.stat().st_size // PAGE_SIZE)


def test_every_access_kind_computes_the_same_output(bench_env: BenchEnvironment,
                                                    tmp_path: Path) -> None:
    model = bench_env.models["llm-4m"]
    ep = bench_env.endpoint("loopback")
    local = run_spec(_spec(model, {"kind": "path", "root": str(model.files.folder)}))
    repo = run_spec(_spec(model, _cvmfs_access(bench_env, model, tmp_path / "c1", "repository")))
    fs = run_spec(_spec(model, _cvmfs_access(bench_env, model, tmp_path / "c2", "fsspec")))
    download = run_spec(_spec(model, {"kind": "download",
                                      "base_url": f"{ep.plain_url}/{model.name}",
                                      "dest": str(tmp_path / "dl")}))
    digests = {r["output_sha256"] for r in (local, repo, fs, download)}
    assert len(digests) == 1
    assert fs["bytes_in_memory"] == model.files.nbytes
    assert (tmp_path / "dl" / "model.onnx.data").stat().st_size == \
        (model.files.folder / "model.onnx.data").stat().st_size
    assert download["acquire_s"] > 0


def test_safetensors_touch_is_the_same_from_disk_and_memory(bench_env: BenchEnvironment,
                                                            tmp_path: Path) -> None:
    model = bench_env.models["st-1m"]
    disk = run_spec(_spec(model, {"kind": "path", "root": str(model.files.folder)}))
    memory = run_spec(_spec(model, _cvmfs_access(bench_env, model, tmp_path / "c", "fsspec")))
    assert disk["output_sha256"] == memory["output_sha256"]
    assert memory["bytes_in_memory"] == model.files.nbytes


def test_worker_process_reports_failures_as_results(tmp_path: Path) -> None:
    spec = {"model": {"name": "x", "entry": "model.onnx", "files": ["model.onnx"]},
            "runtime": "onnxruntime", "access": {"kind": "path", "root": str(tmp_path)}}
    result, wall = run_worker(spec, tmp_path, timeout=60)
    assert result["ok"] is False and "model.onnx" in result["error"] and wall > 0
    usage = subprocess.run([sys.executable, "-m", "cvmfs_ml.bench.worker"],
                           capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr
    spec["access"] = {"kind": "teleport"}
    result, _ = run_worker(spec, tmp_path, timeout=60)
    assert result["ok"] is False and "teleport" in result["error"]
    assert json.loads((tmp_path / "spec.json").read_text())["access"]["kind"] == "teleport"
