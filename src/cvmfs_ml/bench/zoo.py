"""The benchmark's models: named specs, built on demand into folders and reused across runs.

Generating a 2 GiB model takes tens of seconds, so :func:`build_model` writes a stamp file
(``.bench-model.json``) next to the files and reuses the folder when the spec is unchanged.
Each built model knows the runtime that loads it and the inputs the worker feeds it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.modes import ModelFiles

__all__ = ["KINDS", "BuiltModel", "ModelSpec", "build_model", "missing_dependency"]

KINDS = ("mlp", "part", "llm", "safetensors", "torch")
_STAMP = ".bench-model.json"


@dataclass(frozen=True)
class ModelSpec:
    """A model to generate.

    ``kind``: ``mlp`` (small inline ONNX), ``part`` (Particle Transformer ONNX; torch +
    weaver-core), ``llm`` (LLM-shaped ONNX with external data of ``size`` bytes), ``safetensors``
    (the same tensors as one .safetensors file) or ``torch`` (a ``torch.save`` state dict).
    """

    name: str
    kind: str
    size: int = 0
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, not {self.kind!r}")


@dataclass(frozen=True)
class BuiltModel:
    """A generated model: its files (:class:`ModelFiles`) and how the worker runs it."""

    spec: ModelSpec
    files: ModelFiles
    inputs: dict[str, int]  # keyword arguments of generators.example_inputs
    tokens_per_run: int | None  # for tokens/s (LLM-shaped models)
    build_seconds: float = 0.0
    reused: bool = False  # an identical earlier build was found

    @property
    def name(self) -> str:
        return self.spec.name


def missing_dependency(spec: ModelSpec) -> str | None:
    """Why ``spec`` cannot be built here (a missing package), or None."""
    need = {"part": ("torch", "weaver"), "torch": ("torch",), "safetensors": ("safetensors",)}
    for module in ("onnx", *need.get(spec.kind, ())):
        if importlib.util.find_spec(module) is None:
            return f"{spec.kind} needs the Python package {module!r}"
    return None


def _runtime(kind: str) -> tuple[str, str]:
    """(runtime, entry file) of a model kind."""
    if kind == "safetensors":
        return "safetensors", "model.safetensors"
    if kind == "torch":
        return "torch", "model.pt"
    return "onnxruntime", "model.onnx"


def _inputs(spec: ModelSpec) -> tuple[dict[str, int], int | None]:
    if spec.kind == "llm":
        return {"batch": 1, "seq": 1}, 1
    if spec.kind == "part":
        return {"batch": 1, "particles": 64}, None
    if spec.kind == "mlp":
        return {"batch": 8}, None
    return {}, None


def _generate(spec: ModelSpec, folder: Path) -> None:
    from cvmfs_ml.bench import generators as g

    if spec.kind == "mlp":
        g.make_mlp_onnx(folder / "model.onnx", seed=spec.seed)
    elif spec.kind == "part":
        g.make_particle_transformer_onnx(folder / "model.onnx", seed=spec.seed or 42)
    elif spec.kind == "llm":
        g.make_llm_onnx(folder, total_bytes=spec.size, dtype=spec.dtype, seed=spec.seed)
    elif spec.kind == "safetensors":
        g.make_safetensors(folder / "model.safetensors", spec.size, dtype=spec.dtype,
                           seed=spec.seed)
    elif spec.kind == "torch":
        import safetensors.torch
        import torch

        tmp = folder / "tmp.safetensors"
        g.make_safetensors(tmp, spec.size, dtype=spec.dtype, seed=spec.seed)
        torch.save(safetensors.torch.load_file(str(tmp)), folder / "model.pt")
        tmp.unlink()


def build_model(spec: ModelSpec, root: str | os.PathLike[str]) -> BuiltModel:
    """Generate ``spec`` into ``root/<name>/`` (or reuse an identical earlier build)."""
    import time

    folder = Path(root) / spec.name
    stamp = folder / _STAMP
    wanted = asdict(spec)
    seconds = 0.0
    try:
        fresh = json.loads(stamp.read_text()).get("spec") != wanted
    except (OSError, ValueError):
        fresh = True
    if fresh:
        reason = missing_dependency(spec)
        if reason:
            raise ImportError(reason)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        _generate(spec, folder)
        seconds = time.perf_counter() - started
        stamp.write_text(json.dumps({"spec": wanted, "build_seconds": seconds}))
    else:
        seconds = float(json.loads(stamp.read_text()).get("build_seconds", 0.0))
    files = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                         if p.is_file() and p.name != _STAMP))
    runtime, entry = _runtime(spec.kind)
    nbytes = sum((folder / f).stat().st_size for f in files)
    inputs, tokens = _inputs(spec)
    return BuiltModel(spec, ModelFiles(spec.name, folder, entry, files, runtime, nbytes),
                      inputs, tokens, seconds, reused=not fresh)


def model_record(model: BuiltModel) -> dict[str, Any]:
    """The ``models`` entry of a results document."""
    return {"name": model.name, **{k: v for k, v in asdict(model.spec).items() if k != "name"},
            "runtime": model.files.runtime, "entry": model.files.entry,
            "files": list(model.files.files), "bytes": model.files.nbytes,
            "build_seconds": round(model.build_seconds, 3)}
