"""Storage modes: cache states really are what they claim, and each mode serves the model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.bench.environment import BenchEnvironment, run_worker
from cvmfs_ml.bench.modes import (
    MODES,
    CacheState,
    DownloadMode,
    Endpoint,
    FsspecMode,
    FuseMode,
    GetMode,
    ModeContext,
    make_mode,
)
from cvmfs_ml.bench.residency import resident_fraction
from cvmfs_ml.bench.worker import run_spec
from cvmfs_ml.errors import ConfigError


def _spec(model, access):  # type: ignore[no-untyped-def]
    return {"model": {"name": model.name, "entry": model.files.entry,
                      "files": list(model.files.files)},
            "runtime": model.files.runtime, "access": access, "inputs": model.inputs,
            "inference_runs": 0, "threads": 1, "residency": access["kind"] == "path"}


def _read_all(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            path.read_bytes()


def test_mode_registry_and_misconfiguration(tmp_path: Path) -> None:
    assert set(MODES) == {"local", "fuse", "fsspec", "get", "path", "download", "oci"}
    with pytest.raises(ConfigError):
        make_mode("carrier-pigeon")
    with pytest.raises(ConfigError):
        FsspecMode().start(ModeContext(tmp_path))  # no endpoint
    ep = Endpoint("loopback", "http://127.0.0.1:1/cvmfs/x", "x", tmp_path / "x.pub")
    with pytest.raises(ConfigError):
        DownloadMode().start(ModeContext(tmp_path, ep))  # no plain files served
    with pytest.raises(ConfigError):
        make_mode("oci").start(ModeContext(tmp_path, ep))  # no registry
    assert make_mode("local").states == (CacheState.COLD, CacheState.HOT)
    assert DownloadMode.states == (CacheState.COLD,)


def test_local_cold_drops_the_page_cache(bench_env: BenchEnvironment) -> None:
    model = bench_env.models["llm-4m"]
    data = model.files.folder / "model.onnx.data"
    mode = make_mode("local")
    mode.start(bench_env.mode_context(None))
    _read_all(model.files.folder)
    mode.prepare(model.files, CacheState.HOT)
    assert resident_fraction(data) == 1.0
    mode.prepare(model.files, CacheState.COLD)
    assert resident_fraction(data) < 0.05
    assert mode.access(model.files, Path("/x")) == {"kind": "path",
                                                    "root": str(model.files.folder)}


def test_path_mode_serves_any_folder(bench_env: BenchEnvironment) -> None:
    model = bench_env.models["mlp"]
    mode = make_mode("path", root=model.files.folder.parent)
    mode.start(bench_env.mode_context(None))
    mode.prepare(model.files, CacheState.WARM)
    result = run_spec(_spec(model, mode.access(model.files, Path("/x"))))
    assert result["pre_resident_fraction"] < 0.05 and result["output_sha256"]


def test_fsspec_states_wipe_and_keep_the_client_cache(bench_env: BenchEnvironment,
                                                      tmp_path: Path) -> None:
    model = bench_env.models["llm-4m"]
    mode = FsspecMode()
    mode.start(ModeContext(tmp_path, bench_env.endpoint("loopback")))
    assert mode.settings()["client"] == "fsspec"
    before = bench_env.origin.counters()  # type: ignore[union-attr]
    mode.prepare(model.files, CacheState.COLD)
    cold = run_spec(_spec(model, mode.access(model.files, tmp_path)))
    fetched = bench_env.origin.counters() - before  # type: ignore[union-attr]
    assert fetched.bytes >= 0.9 * model.files.nbytes  # "auto" may zlib the small graph
    cached = sum(p.stat().st_size for p in mode.cache.rglob("*") if p.is_file())
    assert cached >= model.files.nbytes
    mode.prepare(model.files, CacheState.WARM)  # keeps the cache
    middle = bench_env.origin.counters()  # type: ignore[union-attr]
    warm = run_spec(_spec(model, mode.access(model.files, tmp_path)))
    refetched = bench_env.origin.counters() - middle  # type: ignore[union-attr]
    assert refetched.bytes < 64 * 1024  # manifest and whitelist only
    assert warm["output_sha256"] == cold["output_sha256"]
    mode.prepare(model.files, CacheState.COLD)
    assert not any(p.is_file() and p.stat().st_size > 2**20 for p in mode.cache.rglob("*"))


def test_get_mode_copies_through_the_client_cache(bench_env: BenchEnvironment,
                                                  tmp_path: Path) -> None:
    """``model get`` without a mount: cold fetches everything, warm nothing but the manifest;
    the copy is the published model (same output) and is removed after the measurement."""
    model = bench_env.models["llm-4m"]
    reference = run_spec(_spec(model, {"kind": "path", "root": str(model.files.folder)}))
    mode = GetMode()
    mode.start(ModeContext(tmp_path, bench_env.endpoint("loopback")))
    assert mode.settings()["mode"] == "get" and "model get" in mode.settings()["client"]
    origin = bench_env.origin
    assert origin is not None
    digests = []
    for state, most_bytes in ((CacheState.COLD, None), (CacheState.WARM, 64 * 1024)):
        scratch = tmp_path / state.value
        scratch.mkdir()
        mode.prepare(model.files, state)
        before = origin.counters()
        result, _ = run_worker(_spec(model, mode.access(model.files, scratch)), scratch, 120)
        assert result["ok"], result.get("error")
        fetched = (origin.counters() - before).bytes
        if most_bytes is None:
            assert fetched >= 0.9 * model.files.nbytes
        else:
            assert fetched < most_bytes  # manifest and whitelist only: the copy is from cache
        copy = scratch / "get" / "model.onnx.data"
        assert copy.stat().st_size == (model.files.folder / "model.onnx.data").stat().st_size
        digests.append(result["output_sha256"])
        mode.after(model.files, scratch)
        assert not (scratch / "get").exists()
    assert digests == [reference["output_sha256"]] * 2


@pytest.mark.service
def test_fuse_mode_mounts_remounts_and_unmounts(bench_env: BenchEnvironment, tmp_path: Path,
                                                need_fuse: None) -> None:
    model = bench_env.models["llm-4m"]
    mode = FuseMode()
    mode.start(ModeContext(tmp_path, bench_env.endpoint("loopback")))
    try:
        mode.prepare(model.files, CacheState.COLD)
        assert mode.mount is not None and mode.mount.running
        access = mode.access(model.files, tmp_path)
        cold = run_spec(_spec(model, access))
        assert cold["pre_resident_fraction"] < 0.05
        first = mode.mount
        mode.prepare(model.files, CacheState.HOT)
        assert mode.mount is first  # hot keeps the mount and its page cache
        hot = run_spec(_spec(model, access))
        assert hot["pre_resident_fraction"] > 0.9
        mode.prepare(model.files, CacheState.WARM)
        assert mode.mount is not first  # warm remounts: page cache gone, client cache kept
        warm = run_spec(_spec(model, access))
        assert warm["pre_resident_fraction"] < 0.05
        assert cold["output_sha256"] == hot["output_sha256"] == warm["output_sha256"]
        assert mode.settings()["mount_seconds_median"] > 0
    finally:
        mode.stop()
    assert not os.path.ismount(mode.mountpoint)


@pytest.mark.service
def test_download_and_oci_modes(bench_env: BenchEnvironment, tmp_path: Path,
                                need_service: Callable[[str], None]) -> None:
    need_service("docker-registry")
    model = bench_env.models["llm-4m"]
    reference = run_spec(_spec(model, {"kind": "path", "root": str(model.files.folder)}))
    for name in ("download", "oci"):
        mode = make_mode(name)
        mode.start(bench_env.mode_context(bench_env.endpoint("loopback", registry=True)))
        scratch = tmp_path / name
        scratch.mkdir()
        mode.prepare(model.files, CacheState.COLD)
        result, _ = run_worker(_spec(model, mode.access(model.files, scratch)), scratch, 120)
        assert result["ok"], result.get("error")
        assert result["output_sha256"] == reference["output_sha256"]
        assert result["acquire_s"] > 0
        mode.after(model.files, scratch)
        assert not (scratch / name).exists()
        mode.stop()
