"""cvmfs-ml in CVMFS's continuous benchmarking: the workload scripts and the CSV export.

The scripts in ``integrations/cvmfs-continuous-benchmark/`` run, as the harness runs them (N
parallel copies), against a real cvmfs-ml FUSE mount and must agree with the same workload on
the original files. The export is read back the way the harness's uploader reads it (pandas,
``build_name`` split at its last ``-``), and its quartiles are recomputed from the measurements.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cvmfs_ml.bench.export import CVMFS_CI_COLUMNS, cvmfs_ci_rows, quartiles, write_cvmfs_ci
from cvmfs_ml.bench.generators import make_mlp_onnx, make_safetensors
from cvmfs_ml.errors import FormatError

HARNESS = Path(__file__).resolve().parents[2] / "integrations" / "cvmfs-continuous-benchmark"
FQRN = "model-registry.cvmfs-ml.test"


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _run_copies(script: Path, env: dict[str, str], copies: int) -> list[dict[str, Any]]:
    """Start ``copies`` at once (with thread ids, as ``send-thread-id``), wait for all."""
    procs = [subprocess.Popen([str(script), str(i)], cwd=HARNESS, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(copies)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def harness_config_errors(config: dict[str, Any]) -> list[str]:
    """The harness's own checks of its YAML (``verifyYAML`` in its config reader, restated):
    ``avail_client_configs`` and ``avail_cmds`` present and non-empty; at least one section
    whose name holds ``run``; in each (``use_cvmfs`` a bool, default true) ``commands``,
    ``cvmfs_build_dirs``, ``num_threads`` and ``client_configs`` non-empty, every command in
    ``avail_cmds`` with repositories, every client config in ``avail_client_configs``."""
    errors = [f"missing or empty: {label}" for label in ("avail_client_configs", "avail_cmds")
              if not config.get(label)]  # fmt: skip
    runs = [key for key in config if "run" in key]
    if not runs:
        errors.append('no "run" section')
    for key in runs:
        run = config[key]
        if not isinstance(run.get("use_cvmfs", True), bool):
            errors.append(f"{key}: use_cvmfs is not a boolean")
        for label in ("commands", "cvmfs_build_dirs", "num_threads", "client_configs"):
            if not run.get(label):
                errors.append(f"{key}: mandatory {label} missing or empty")
        for cmd in run.get("commands", []):
            if cmd not in config.get("avail_cmds", {}):
                errors.append(f"{key}: unknown cmd {cmd}")
            elif not config["avail_cmds"][cmd].get("repos"):
                errors.append(f"{key}: {cmd} has no repos")
        for group in run.get("client_configs", []):
            errors += [f"{key}: unknown client_config {name}" for name in group
                       if name not in config.get("avail_client_configs", {})]  # fmt: skip
    return errors


def test_yaml_registers_every_script_in_the_harness_layout() -> None:
    config = yaml.safe_load((HARNESS / "benchmark.yaml").read_text())
    assert harness_config_errors(config) == []
    broken = {k: v for k, v in config.items() if k != "avail_client_configs"}
    assert harness_config_errors(broken) == [
        "missing or empty: avail_client_configs", "run-cvmfs-ml: unknown client_config default"]
    commands = config["avail_cmds"]
    assert commands, "no avail_cmds"
    for name, entry in commands.items():
        script = HARNESS / entry["command"]
        assert script.is_file() and os.access(script, os.X_OK), name
        assert entry["repos"] and all("." in repo for repo in entry["repos"]), name
    run = config["run-cvmfs-ml"]
    assert set(run["commands"]) <= set(commands)
    assert all(isinstance(n, int) and n > 0 for n in run["num_threads"])


def test_workload_fails_in_one_line_on_a_missing_model(tmp_path: Path) -> None:
    env = dict(os.environ, CVMFS_ML_BENCH_ONNX=str(tmp_path / "missing.onnx"))
    proc = subprocess.run([str(HARNESS / "scripts" / "90-cvmfs-ml-onnx.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing.onnx" in proc.stderr


@pytest.mark.service
def test_scripts_run_as_parallel_copies_from_a_cvmfs_ml_mount(tmp_path: Path) -> None:
    if not (shutil.which("fusermount3") and os.path.exists("/dev/fuse")):
        if os.environ.get("CI"):
            pytest.fail("CI must provide FUSE")
        pytest.skip("no FUSE here")
    from cvmfs_ml.client.fuse import mount
    from cvmfs_ml.models.layout import ModelRef
    from cvmfs_ml.models.publish import publish_model
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings
    from cvmfs_ml.storage.http import RepositoryServer

    onnx_dir, st_dir = tmp_path / "onnx", tmp_path / "st"
    onnx_dir.mkdir()
    st_dir.mkdir()
    make_mlp_onnx(onnx_dir / "model.onnx")
    make_safetensors(st_dir / "model.safetensors", total_bytes=4 * 2**20)
    publisher = create_repository(tmp_path / "srv", FQRN, settings=PublishSettings())
    publish_model(publisher, onnx_dir, ModelRef.parse("bench/mlp:1"))
    publish_model(publisher, st_dir, ModelRef.parse("bench/st:1"))
    local = dict(os.environ, CVMFS_ML_BENCH_ONNX=str(onnx_dir / "model.onnx"),
                 CVMFS_ML_BENCH_SAFETENSORS=str(st_dir / "model.safetensors"))
    expected_onnx = _run_copies(HARNESS / "scripts" / "90-cvmfs-ml-onnx.sh", local, 1)[0]
    expected_st = _run_copies(HARNESS / "scripts" / "91-cvmfs-ml-safetensors.sh", local, 1)[0]

    point = tmp_path / "mnt"
    point.mkdir()
    with RepositoryServer(tmp_path / "srv").start() as server:
        handle = mount(f"{server.url}/cvmfs/{FQRN}", point, cache=tmp_path / "cache",
                       public_key=publisher.keys.paths.master_public,
                       log_file=tmp_path / "fuse.log", timeout=60.0)
        try:
            env = dict(os.environ, CVMFS_ML_BENCH_ONNX=str(point / "bench/mlp/1/model.onnx"),
                       CVMFS_ML_BENCH_SAFETENSORS=str(point / "bench/st/1/model.safetensors"))
            onnx_runs = _run_copies(HARNESS / "scripts" / "90-cvmfs-ml-onnx.sh", env, 3)
            st_runs = _run_copies(HARNESS / "scripts" / "91-cvmfs-ml-safetensors.sh", env, 3)
            affairs = _cli("stats", str(point), "--internal-affairs")
            stats = json.loads(_cli("stats", str(point), "--json"))
        finally:
            handle.unmount()
        # What the harness does with `cvmfs_talk internal affairs` (benchmark_time.py):
        # rows after the "Name|Value|Description" header, name|value split on "|".
        counters: dict[str, float] = {}
        found = False
        for line in affairs.splitlines():
            if found:
                name, value = line.split("|")[:2]
                counters[name] = float(value)
            if "Name|Value|Description" in line:
                found = True
        assert counters["download.sz_transferred_bytes"] == stats["fetch"]["bytes"] > 4 * 2**20
        assert counters["fetch.n_downloads"] == stats["fetch"]["objects"] >= 2
        assert counters["cvmfs.n_fs_open"] >= 6  # six copies opened a model each
    assert {r["output_sha256"] for r in onnx_runs} == {expected_onnx["output_sha256"]}
    assert {r["output_sha256"] for r in st_runs} == {expected_st["output_sha256"]}
    assert sorted(r["thread"] for r in onnx_runs) == ["0", "1", "2"]
    assert all(r["first_inference_s"] >= r["load_s"] > 0 for r in onnx_runs)


def _results(seed: int) -> dict[str, Any]:
    """A results document shaped like ``bench run``'s, with measurements from a generator."""
    rng = np.random.default_rng(seed)
    rows = []
    for mode, states in (("local", ("cold", "hot")), ("fuse", ("cold", "warm", "hot"))):
        for state in states:
            for repeat in range(int(rng.integers(1, 6))):
                rows.append({"model": "mlp", "runtime": "onnxruntime", "mode": mode,
                             "network": "loopback", "cache_state": state, "repeat": repeat,
                             "ok": True, "first_inference_s": float(rng.uniform(0.01, 2)),
                             "wall_s": float(rng.uniform(0.1, 3)),
                             "peak_rss_bytes": int(rng.integers(2**20, 2**30))})
    rows.append({"model": "mlp", "runtime": "onnxruntime", "mode": "fuse", "network": "loopback",
                 "cache_state": "cold", "repeat": 99, "ok": False, "first_inference_s": 1e9})
    return {"run_id": f"r{seed}", "started": "2026-12-03T20:00:00+00:00",
            "versions": {"cvmfs-ml": "0.1.0"}, "commit": "abc1234", "measurements": rows}


@pytest.mark.parametrize("seed", range(5))
def test_export_round_trips_through_the_harness_reader(seed: int) -> None:
    pd = pytest.importorskip("pandas")
    doc = _results(seed)
    buffer = io.StringIO()
    count = write_cvmfs_ci(cvmfs_ci_rows(doc), buffer)
    buffer.seek(0)
    # What the harness's uploader does: read, strip, split build_name at its last '-'.
    df = pd.read_csv(buffer)
    assert tuple(df.columns) == CVMFS_CI_COLUMNS and len(df) == count
    df[["version", "commit"]] = df["build_name"].str.rsplit("-", n=1, expand=True)
    assert set(df["version"]) == {"0.1.0"} and set(df["commit"]) == {"abc1234"}
    for mode in ("local", "fuse"):
        real = df[(df["client_config"] == f"{mode}@loopback") & (df["metric"] == "real")]
        assert len(real) == 1
        for state in ("cold", "warm", "hot"):
            values = [m["wall_s"] for m in doc["measurements"] if m["ok"]
                      and m["mode"] == mode and m["cache_state"] == state]
            cells = [real.iloc[0][f"{state}_cache_{s}"] for s in
                     ("min_val", "first_quartile", "median", "third_quartile", "max_val")]
            if not values:
                assert all(pd.isna(c) for c in cells)  # a state the mode does not have
                continue
            assert cells == pytest.approx(list(np.percentile(values, [0, 25, 50, 75, 100])))
    rss = df[df["metric"] == "nmax_resident_set_size_kb"]
    peak = max(m["peak_rss_bytes"] for m in doc["measurements"] if m["ok"]) / 1024
    cells = rss[[f"{s}_cache_max_val" for s in ("cold", "warm", "hot")]]
    assert cells.max().max() == pytest.approx(peak)


def test_quartiles_match_numpy_and_reject_nothing() -> None:
    for values in ([3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.5] * 7):
        assert quartiles(values) == pytest.approx(
            tuple(np.percentile(values, [0, 25, 50, 75, 100])))
    with pytest.raises(ValueError):
        quartiles([])
    with pytest.raises(FormatError):
        cvmfs_ci_rows({"summary": []})


def test_cli_export_writes_the_csv(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results(7)))
    out = tmp_path / "ci.csv"
    proc = subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", "bench", "export", str(results),
                           "--format", "cvmfs-ci", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert rows and set(rows[0]) == set(CVMFS_CI_COLUMNS)
    bad = subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", "bench", "export",
                          str(tmp_path / "nope.json")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
