"""The benchmark runner: model × storage mode × cache state × network, each in a fresh process.

:func:`run_profile` is ``cvmfs-ml bench run``. It

1. builds the profile's models (:mod:`cvmfs_ml.bench.zoo`; reused across runs),
2. publishes them into one cvmfs-ml repository and serves it (nginx as in docs/nginx.conf,
   or the built-in server), with the plain model folders beside it for the download mode and
   a docker-registry for the OCI mode,
3. for every network (loopback, or a :data:`~cvmfs_ml.testing.netem.WAN_PROFILES` entry emulated
   by a :class:`~cvmfs_ml.testing.netem.DelayProxy` in front of the servers), every storage mode,
   model and cache state: prepares the caches, runs ``repeats`` measurements, each in a fresh
   :mod:`~cvmfs_ml.bench.worker` process, and counts what reached the origin,
4. optionally runs N concurrent cold clients through one Squid, and records access patterns
   (the FUSE client's read trace and mincore residency after a cold load) as heat maps,
5. checks the results for sanity (identical outputs everywhere, hot not slower than cold,
   cold runs really started cold) and writes the report (:mod:`cvmfs_ml.bench.report`).

Nothing here asserts timings; the checks compare runs of the same scenario family only. The
profiles live in :mod:`~cvmfs_ml.bench.profiles`, the environment and the worker runs in
:mod:`~cvmfs_ml.bench.environment`, the Squid experiment in :mod:`~cvmfs_ml.bench.concurrency`;
their public names are re-exported here.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvmfs_ml.bench import report as rpt
from cvmfs_ml.bench.concurrency import run_concurrency
from cvmfs_ml.bench.environment import BenchEnvironment, run_worker
from cvmfs_ml.bench.modes import (
    MODES,
    CacheState,
    Endpoint,
    FuseMode,
    StorageMode,
    make_mode,
)
from cvmfs_ml.bench.profiles import EXTRA_MODELS, FQRN, PROFILES, Profile, default_workdir
from cvmfs_ml.bench.upstream import UpstreamMode, upstream_unavailable
from cvmfs_ml.bench.zoo import BuiltModel, model_record
from cvmfs_ml.errors import ConfigError, CvmfsMlError
from cvmfs_ml.testing import OriginCounters

__all__ = [
    "FQRN",
    "PROFILES",
    "BenchEnvironment",
    "Profile",
    "default_workdir",
    "run_concurrency",
    "run_profile",
    "run_worker",
]

_STATE_ORDER = (CacheState.COLD, CacheState.WARM, CacheState.HOT)
HOT_TOLERANCE = (1.25, 0.05)
"""hot counts as slower than cold only above cold × 1.25 + 50 ms (noise on tiny models)."""


def _needs_endpoint(mode_name: str) -> bool:
    """Whether the mode reads the published repository (so it must be published and served)."""
    cls = UpstreamMode if mode_name == "upstream" else MODES.get(mode_name)
    return cls is not None and cls.needs_endpoint


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# --------------------------------------------------------------------------------------------
# the matrix


@dataclass
class _Run:
    env: BenchEnvironment
    profile: Profile
    out: Path
    measurements: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    residency: dict[tuple[str, str, str], Path] = field(default_factory=dict)
    mode_settings: dict[str, Any] = field(default_factory=dict)


def _spec(run: _Run, model: BuiltModel, access: dict[str, Any], *, residency: bool,
          residency_out: Path | None = None, inference_runs: int | None = None) -> dict[str, Any]:
    return {
        "model": {"name": model.name, "entry": model.files.entry,
                  "files": list(model.files.files)},
        "runtime": model.files.runtime,
        "access": access,
        "inputs": model.inputs,
        "inference_runs": run.profile.inference_runs if inference_runs is None
        else inference_runs,
        "threads": run.profile.threads,
        "new_tokens": model.tokens_per_run or 0,
        "ort_config": run.profile.ort_config,
        "residency": residency,
        "residency_out": str(residency_out) if residency_out else None,
    }


def _measure(run: _Run, mode: StorageMode, model: BuiltModel, state: CacheState, network: str,
             repeat: int, *, keep: bool = True,
             residency_out: Path | None = None) -> dict[str, Any]:
    """Prepare, run one worker, count origin traffic; append the row when ``keep``."""
    env = run.env
    with tempfile.TemporaryDirectory(prefix="m.", dir=env.workdir) as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        mode.prepare(model.files, state)
        prepare_s = time.perf_counter() - started
        res_out = residency_out
        first_cold = state is CacheState.COLD and repeat == 0
        if res_out is None and keep and mode.path_based and first_cold:
            res_out = run.out / "access" / f"residency-{model.name}-{mode.name}-{network}.npz"
            res_out.parent.mkdir(parents=True, exist_ok=True)
        spec = _spec(run, model, mode.access(model.files, scratch),
                     residency=mode.path_based, residency_out=res_out)
        origin = env.origin
        before = origin.counters() if origin else OriginCounters()
        proxies = env._proxies.get(network, [])
        proxy_before = proxies[0].stats()["bytes_down"] if proxies else 0
        result, wall = run_worker(spec, scratch, run.profile.timeout)
        after = origin.counters() if origin else OriginCounters()
        proxy_after = proxies[0].stats()["bytes_down"] if proxies else 0
        mode.after(model.files, scratch)
    lat = result.get("latencies_s") or []
    p50 = _percentile(lat, 50)
    row: dict[str, Any] = {
        "model": model.name, "runtime": model.files.runtime, "mode": mode.name,
        "network": network, "cache_state": state.value, "repeat": repeat,
        "ok": bool(result.get("ok")), "error": result.get("error"),
        "model_bytes": model.files.nbytes,
        **{k: result.get(k) for k in ("import_s", "acquire_s", "open_s", "first_run_s",
                                      "first_inference_s", "first_token_s", "peak_rss_bytes",
                                      "major_faults",
                                      "rchar", "disk_read_bytes", "pre_resident_fraction",
                                      "post_resident_fraction", "output_sha256")},
        "latency_p50_s": p50,
        "latency_p95_s": _percentile(lat, 95),
        "tokens_per_s": (model.tokens_per_run / p50) if model.tokens_per_run and p50 else None,
        "origin_requests": (after - before).requests if mode.needs_endpoint else 0,
        "origin_bytes": (after - before).bytes if mode.needs_endpoint else 0,
        "proxy_bytes": (proxy_after - proxy_before) if proxies else None,
        "wall_s": wall,
        "prepare_s": prepare_s,
    }
    if res_out is not None and res_out.exists():
        run.residency[(model.name, mode.name, network)] = res_out
    if keep:
        run.measurements.append(row)
        if not row["ok"]:
            run.errors.append(f"{model.name}/{mode.name}/{network}/{state.value}#{repeat}: "
                              f"{row['error']}")
    return row


def _run_mode(run: _Run, mode_name: str, network: str, models: Sequence[BuiltModel],
              endpoint: Endpoint | None) -> None:
    env, profile = run.env, run.profile
    options = {"root": env.mounted} if mode_name == "path" else {}
    if mode_name == "upstream" and (reason := upstream_unavailable()) is not None:
        note = f"mode upstream: {reason}"  # an expected absence, not a failure of the run
        if note not in env.skipped:
            env.skipped.append(note)
        env.log(f"skip {note}")
        return
    mode = make_mode(mode_name, **options)
    try:
        mode.start(env.mode_context(endpoint))
    except (ConfigError, CvmfsMlError, OSError) as exc:
        run.errors.append(f"mode {mode_name} on {network}: {exc}")
        env.log(f"skip mode {mode_name} on {network}: {exc}")
        return
    try:
        states = [s for s in _STATE_ORDER if s.value in profile.states and s in mode.states]
        for model in models:
            primed = False
            for state in states:
                if state is not CacheState.COLD and not primed:  # a first run fills the caches
                    _measure(run, mode, model, CacheState.COLD, network, -1, keep=False)
                for repeat in range(profile.repeats):
                    row = _measure(run, mode, model, state, network, repeat)
                    primed = True
                    env.log(f"{network:>10} {mode_name:>8} {model.name:>10} {state.value:>4} "
                            f"#{repeat}: " + (f"{row['first_inference_s']:.3f} s to first "
                                              f"inference" if row["ok"] else
                                              f"FAILED {row['error']}"))
        run.mode_settings[f"{mode_name}@{network}"] = mode.settings()
    except (CvmfsMlError, OSError) as exc:
        run.errors.append(f"mode {mode_name} on {network}: {exc}")
        env.log(f"mode {mode_name} on {network} failed: {exc}")
    finally:
        mode.stop()


# --------------------------------------------------------------------------------------------
# access patterns


def _load_residency(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        out = {}
        for key in data.files:
            if key.startswith("__pages__"):
                continue
            pages = int(data[f"__pages__{key}"])
            out[key] = np.unpackbits(data[key])[:pages].astype(bool)
    return out


def _access_patterns(run: _Run, models: Sequence[BuiltModel]) -> list[dict[str, Any]]:
    """For each model: cold-load residency (local disk and FUSE) and a traced cold FUSE load.

    The residency strips (mincore after a cold load) work on any file system; the heat map
    comes from the FUSE client's read trace (``cvmfs-ml mount --trace``), which also has the
    order and size of the reads.
    """
    from cvmfs_ml.bench.heatmap import plot_heatmap, plot_residency, summarise_accesses
    from cvmfs_ml.client.trace import accesses_from_trace, load_trace

    env = run.env
    out = run.out / "access"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    local = make_mode("local")
    local.start(env.mode_context(None))
    fuse: FuseMode | None = FuseMode()
    try:
        fuse.start(env.mode_context(env.endpoint("loopback")))
    except (ConfigError, OSError) as exc:
        run.errors.append(f"access patterns without FUSE: {exc}")
        fuse = None
    try:
        for model in models:
            key = (model.name, "local", "loopback")
            if key not in run.residency:
                res_out = out / f"residency-{model.name}-local-loopback.npz"
                row = _measure(run, local, model, CacheState.COLD, "loopback", 0, keep=False,
                               residency_out=res_out)
                if not row["ok"]:
                    run.errors.append(f"access pattern {model.name}/local: {row['error']}")
            trace = out / f"trace-{model.name}.jsonl"
            if fuse is not None:
                trace.unlink(missing_ok=True)
                fuse.remount_with_trace(trace)
                row = _traced_run(run, fuse, model)
                if not row["ok"]:
                    run.errors.append(f"traced load {model.name}: {row['error']}")
            maps: dict[str, np.ndarray] = {}
            for mode in ("local", "fuse"):
                path = run.residency.get((model.name, mode, "loopback"))
                if path is not None and path.exists():
                    for name, m in _load_residency(path).items():
                        maps[f"{mode}: {name}"] = m
            if maps:
                png = plot_residency(maps, out / f"residency-{model.name}.png",
                                     f"{model.name}: pages cached after a cold load "
                                     f"({model.files.runtime})")
                for label, m in maps.items():
                    source, _, name = label.partition(": ")
                    rows.append({"model": model.name, "runtime": model.files.runtime,
                                 "source": f"mincore ({source})", "file": name,
                                 "fraction_of_file": float(m.mean()) if m.size else None,
                                 "png": f"access/{png.name}"})
            if trace.exists() and trace.stat().st_size:
                accesses, sizes = accesses_from_trace(load_trace(trace))
                if accesses:
                    png = plot_heatmap(accesses, sizes, out / f"heatmap-{model.name}.png",
                                       f"{model.name}: reads seen by the FUSE client, cold load "
                                       f"({model.files.runtime})")
                    total = summarise_accesses(accesses, sizes)["total"]
                    rows.append({"model": model.name, "runtime": model.files.runtime,
                                 "source": "FUSE trace", "file": "*",
                                 **{k: total.get(k) for k in (
                                     "read_count", "bytes_read", "unique_bytes", "file_size",
                                     "fraction_of_file", "sequential_fraction",
                                     "median_read_size")},
                                 "png": f"access/{png.name}"})
    finally:
        if fuse is not None:
            fuse.stop()
        local.stop()
    return rows


def _traced_run(run: _Run, fuse: FuseMode, model: BuiltModel) -> dict[str, Any]:
    """A cold load on a mount that was just started with ``--trace``; unmount to flush."""
    res_out = run.out / "access" / f"residency-{model.name}-fuse-loopback.npz"
    with tempfile.TemporaryDirectory(prefix="t.", dir=run.env.workdir) as tmp:
        spec = _spec(run, model, fuse.access(model.files, Path(tmp)), residency=True,
                     residency_out=res_out, inference_runs=0)
        result, _ = run_worker(spec, Path(tmp), run.profile.timeout)
    fuse.stop()  # unmounting flushes the trace
    if res_out.exists():
        run.residency[(model.name, "fuse", "loopback")] = res_out
    return {"ok": bool(result.get("ok")), "error": result.get("error")}


# --------------------------------------------------------------------------------------------
# checks


def _checks(measurements: Sequence[dict[str, Any]],
            summary: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    by_model: dict[str, set[str]] = {}
    for m in measurements:
        if m.get("ok") and m.get("output_sha256"):
            by_model.setdefault(m["model"], set()).add(m["output_sha256"])
    differing = sorted(k for k, v in by_model.items() if len(v) > 1)
    checks["outputs_identical"] = {
        "ok": bool(by_model) and not differing,
        "detail": (f"outputs differ for {differing}" if differing else
                   f"every storage mode and cache state gave the same output for "
                   f"{sorted(by_model)}"),
        "per_model": {k: sorted(v) for k, v in by_model.items()},
    }
    failed = [m for m in measurements if not m.get("ok")]
    checks["all_runs_succeeded"] = {"ok": not failed,
                                    "detail": f"{len(failed)} of {len(measurements)} failed"}
    slower = []
    pairs = []
    index = {(s["model"], s["mode"], s["network"], s["cache_state"]): s for s in summary}
    for (model, mode, network, state), s in index.items():
        if state != "hot":
            continue
        cold = index.get((model, mode, network, "cold"))
        if not cold or s.get("first_inference_s") is None or cold.get("first_inference_s") is None:
            continue
        # the fastest repeat is the estimate least disturbed by other load on the machine
        hot_t = s.get("first_inference_s_min") or s["first_inference_s"]
        cold_t = cold.get("first_inference_s_min") or cold["first_inference_s"]
        pairs.append(f"{model}/{mode}/{network}: hot {hot_t:.4f} s vs cold {cold_t:.4f} s "
                     "(fastest repeats)")
        # tolerance for noise (session creation jitters by tens of ms on a shared machine)
        if hot_t > cold_t * HOT_TOLERANCE[0] + HOT_TOLERANCE[1]:
            slower.append(f"{model}/{mode}/{network}")
    checks["hot_not_slower_than_cold"] = {
        "ok": not slower, "detail": ("hot slower than cold for " + ", ".join(slower)
                                     if slower else f"{len(pairs)} pairs compared"),
        "pairs": pairs, "slower": slower,
        "rule": f"fastest hot <= fastest cold x {HOT_TOLERANCE[0]} + {HOT_TOLERANCE[1]} s",
    }
    warm_starts = [m for m in measurements if m.get("cache_state") == "cold"
                   and m.get("pre_resident_fraction") is not None
                   and m["pre_resident_fraction"] > 0.05]
    checks["cold_runs_started_cold"] = {
        "ok": not warm_starts,
        "detail": (f"{len(warm_starts)} cold runs found >5% of the model in the page cache"
                   if warm_starts else "no cold run found the model in the page cache"),
    }
    return checks


# --------------------------------------------------------------------------------------------


def run_profile(profile: Profile | str, out_dir: str | os.PathLike[str], *,
                workdir: str | os.PathLike[str] | None = None,
                log: Callable[[str], None] = print, global_drop: bool = False,
                mounted: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run a profile and write its report to ``out_dir``; return the results document."""
    if isinstance(profile, str):
        try:
            profile = PROFILES[profile]
        except KeyError:
            raise ConfigError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modes = list(profile.modes)
    if mounted and "path" not in modes:
        modes.append("path")
    doc: dict[str, Any] = {
        "schema": rpt.SCHEMA, "run_id": uuid.uuid4().hex[:12], "profile": profile.name,
        "started": rpt.now_iso(), "machine": rpt.machine_info(), "versions": rpt.versions(),
    }
    t_start = time.perf_counter()
    with BenchEnvironment(workdir or default_workdir(out), profile, log=log,
                          global_drop=global_drop, mounted=mounted) as env:
        run = _Run(env, profile, out)
        models = env.build(profile.models)
        access_models = env.build(profile.access_models)
        conc_model = None
        if profile.concurrency and profile.concurrency_model:
            spec = next((m for m in profile.models if m.name == profile.concurrency_model),
                        EXTRA_MODELS.get(profile.concurrency_model))
            if spec is not None:
                conc_model = (env.build([spec]) or [None])[0]
        if any(_needs_endpoint(m) for m in modes) or access_models or conc_model:
            env.publish()
        for network in profile.networks:
            net_models = models if network == "loopback" else [
                m for m in models if not profile.network_models
                or m.name in profile.network_models]
            for mode_name in modes:
                if network != "loopback" and mode_name not in profile.network_modes:
                    continue
                endpoint = None
                if _needs_endpoint(mode_name):
                    try:
                        endpoint = env.endpoint(network, registry=mode_name == "oci")
                    except (CvmfsMlError, OSError) as exc:
                        run.errors.append(f"{mode_name} on {network}: {exc}")
                        continue
                _run_mode(run, mode_name, network, net_models, endpoint)
        concurrency = []
        if conc_model is not None:
            for n in profile.concurrency:
                try:
                    log(f"concurrency: {n} clients loading {conc_model.name} through one Squid")
                    concurrency.append(run_concurrency(env, conc_model, n,
                                                       timeout=profile.timeout,
                                                       threads=profile.threads))
                except (CvmfsMlError, OSError) as exc:
                    run.errors.append(f"concurrency {n}: {exc}")
        access = []
        if access_models:
            try:
                access = _access_patterns(run, access_models)
            except (CvmfsMlError, OSError) as exc:
                run.errors.append(f"access patterns: {exc}")
        doc["network"] = {n: env.network_description(n) for n in profile.networks}
        doc["settings"] = {
            "profile": profile.record(),
            "origin": env.origin.describe() if env.origin else None,
            "drop_method": env.mode_context(None).drop_method,
            "fqrn": FQRN,
            "workdir": str(env.workdir),
            "modes": run.mode_settings,
            "publish_seconds": env.publish_seconds,
            "inference": "onnxruntime CPU, intra_op threads = profile.threads; LLM-shaped models "
                         "run one token (batch 1, seq 1, no KV cache): tokens/s = 1 / p50; "
                         "safetensors/torch 'inference' = a float64 sum of every tensor",
        }
        doc["models"] = [model_record(m) | {"publish_seconds": env.publish_seconds.get(m.name)}
                         for m in env.models.values()]
        doc["skipped"] = env.skipped
    doc["measurements"] = run.measurements
    doc["summary"] = rpt.summarise(run.measurements)
    doc["concurrency"] = concurrency
    doc["access_patterns"] = access
    doc["checks"] = _checks(run.measurements, doc["summary"])
    doc["errors"] = run.errors
    doc["finished"] = rpt.now_iso()
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    rpt.write_report(doc, out)
    return doc
