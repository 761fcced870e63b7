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
from cvmfs_ml.errors import ConfigError

__all__ = ["KINDS", "BuiltModel", "ModelSpec", "build_model", "missing_dependency", "user_model",
           "user_model_ref"]

KINDS = ("mlp", "part", "llm", "safetensors", "torch", "genai", "user")
_STAMP = ".bench-model.json"
GENAI_NEW_TOKENS = 16
"""Tokens the generative case decodes per run (greedy, after a fixed prompt)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model to generate.

    ``kind``: ``mlp`` (small inline ONNX), ``part`` (Particle Transformer ONNX; torch +
    weaver-core), ``llm`` (LLM-shaped ONNX with external data of ``size`` bytes), ``safetensors``
    (the same tensors as one .safetensors file), ``torch`` (a ``torch.save`` state dict),
    ``genai`` (a Phi-3-architecture decoder of ``size`` weight bytes for onnxruntime-genai), or
    ``user``: the user's model at ``path`` (a file, or a folder: ONNX with external data, or a
    Hugging Face folder), measured as it is (see :func:`user_model`).
    """

    name: str
    kind: str
    size: int = 0
    dtype: str = "float32"
    seed: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, not {self.kind!r}")
        if (self.kind == "user") != bool(self.path):
            raise ValueError("a path is given for (and only for) kind 'user'")


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
    need = {"part": ("torch", "weaver"), "torch": ("torch",), "safetensors": ("safetensors",),
            "genai": ("torch", "transformers", "onnxruntime_genai", "onnx_ir")}
    for module in ("onnx", *need.get(spec.kind, ())):
        if importlib.util.find_spec(module) is None:
            return f"{spec.kind} needs the Python package {module!r}"
    return None


_RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "safetensors": "safetensors", "pytorch": "torch"}
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def user_model(path: str | os.PathLike[str], name: str | None = None) -> ModelSpec:
    """A :class:`ModelSpec` for the user's model at ``path``, after checking it can be run.

    The runtime follows the format the models layer detects: ONNX -> onnxruntime (a folder
    with one ``.onnx`` file and its external data), safetensors -> every tensor read,
    PyTorch -> ``torch.load``; a folder with ``config.json`` and weights -> transformers'
    ``from_pretrained``. Anything else is refused with the format it was found to be.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(f"--model {source}: no such file or folder")
    _user_runtime(source)  # refuse early, before anything is built or published
    label = name or (source.stem if source.is_file() else source.name) or "model"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip(".-") or "model"
    return ModelSpec(safe, "user", path=str(source.absolute()))


def user_model_ref(ref: str) -> ModelSpec:
    """A published version, ``cvmfs://<fqrn>/<ns>/<name>:<version-or-alias>``, as a user model.

    The files come from where ``cvmfs-ml model path`` finds them (the version's folder in a
    mount, else a verified copy materialised from the client's cache, configured the usual
    way); the benchmark then measures that copy like any user folder. The alias is read once:
    the model is named ``<name>-<version>``.
    """
    from cvmfs_ml.models.refs import locate, parse_ref

    uri = parse_ref(ref)
    if uri.fqrn is None or uri.model is None:
        raise ConfigError(f"--model {ref}: give the whole reference, "
                          "cvmfs://<fqrn>/<namespace>/<name>:<version-or-alias>")
    found = locate(uri)
    return user_model(found.path, name=f"{uri.model.name}-{found.version or 'latest'}")


def _user_runtime(source: Path) -> tuple[str, str]:
    """(runtime, entry relative to the model folder) of a user's file or folder."""
    from cvmfs_ml.models.formats import ModelFormatError, detect

    if source.is_dir():
        if (source / "config.json").is_file() and any((source / w).is_file()
                                                      for w in _HF_WEIGHTS):
            return "transformers", "config.json"
        onnx = sorted(p.name for p in source.iterdir() if p.suffix == ".onnx")
        if len(onnx) == 1:
            return "onnxruntime", onnx[0]
        raise ConfigError(f"--model {source}: a folder must hold one .onnx file (found "
                          f"{len(onnx)}) or config.json with weights (a Hugging Face folder)")
    try:
        fmt = detect(str(source))
    except (ModelFormatError, OSError) as exc:
        raise ConfigError(f"--model {source}: {exc}") from exc
    runtime = _RUNTIME_OF_FORMAT.get(fmt or "")
    if runtime is None:
        raise ConfigError(f"--model {source}: format {fmt or 'unknown'} cannot be loaded by the "
                          f"benchmark (it loads {', '.join(_RUNTIME_OF_FORMAT)} and HF folders)")
    return runtime, source.name


def _link_or_copy_tree(source: Path, folder: Path) -> None:
    """The user's files into ``folder``: hard links where one file system allows, else copies
    (never the originals themselves: the runner drops their page cache and serves them)."""
    pairs = ([(source, folder / source.name)] if source.is_file() else
             [(p, folder / p.relative_to(source)) for p in sorted(source.rglob("*"))
              if p.is_file()])
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _runtime(kind: str) -> tuple[str, str]:
    """(runtime, entry file) of a model kind."""
    if kind == "safetensors":
        return "safetensors", "model.safetensors"
    if kind == "torch":
        return "torch", "model.pt"
    if kind == "genai":
        return "onnxruntime-genai", "genai_config.json"
    return "onnxruntime", "model.onnx"


def _inputs(spec: ModelSpec) -> tuple[dict[str, int], int | None]:
    if spec.kind == "llm":
        return {"batch": 1, "seq": 1}, 1
    if spec.kind == "genai":
        return {}, GENAI_NEW_TOKENS
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
    elif spec.kind == "genai":
        from cvmfs_ml.bench.genai import make_phi3_genai

        make_phi3_genai(folder, spec.size, seed=spec.seed)
    elif spec.kind == "user":
        _link_or_copy_tree(Path(spec.path), folder)
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
    if spec.kind == "user":  # a changed file is a new model: remember what was linked
        source = Path(spec.path)
        wanted["source"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in
                            ([source] if source.is_file() else sorted(source.rglob("*")))
                            if p.is_file()]
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
    runtime, entry = (_user_runtime(Path(spec.path)) if spec.kind == "user"
                      else _runtime(spec.kind))
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
