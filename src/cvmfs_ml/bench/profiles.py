"""What a benchmark run covers: :class:`Profile`, the ``short`` (CI) and ``full`` profiles.

Used by :func:`cvmfs_ml.bench.runner.run_profile` (``cvmfs-ml bench run``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.zoo import ModelSpec

__all__ = ["EXTRA_MODELS", "FQRN", "PROFILES", "Profile", "choices", "default_workdir"]

FQRN = "bench.cvmfs-ml.test"
_MiB = 2**20


@dataclass(frozen=True)
class Profile:
    """What a benchmark run covers. ``short`` is the CI profile, ``full`` the real one.

    ``network_modes``/``network_models`` restrict what runs on emulated WAN links (the matrix
    grows fast); ``access_models`` are recorded as access patterns (traced FUSE load and mincore
    residency) whether or not they are in ``models``. ``concurrency`` lists client counts for
    the Squid experiment (needs nginx and squid), run with ``concurrency_model``.
    """

    name: str
    models: tuple[ModelSpec, ...]
    modes: tuple[str, ...] = ("local", "fuse", "fsspec")
    states: tuple[str, ...] = ("cold", "warm", "hot")
    networks: tuple[str, ...] = ("loopback",)
    repeats: int = 3
    inference_runs: int = 10
    threads: int = 1
    origin: str = "builtin"  # "builtin" | "nginx" (falls back to builtin when missing)
    squid: bool = False  # matrix clients go through a Squid
    network_modes: tuple[str, ...] = ("fuse", "fsspec", "download")
    network_models: tuple[str, ...] = ()
    access_models: tuple[ModelSpec, ...] = ()
    concurrency: tuple[int, ...] = ()
    concurrency_model: str = ""
    compression: str = "auto"
    timeout: float = 900.0
    ort_config: dict[str, str] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Profile:
        return replace(self, **changes)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = [asdict(m) for m in self.models]
        d["access_models"] = [asdict(m) for m in self.access_models]
        return d


_SMALL_LLM = ModelSpec("llm-24m", "llm", size=24 * _MiB, dtype="float32")
# The seed's case: a Phi-3-architecture decoder generating text with onnxruntime-genai (the
# field report's Phi-4-mini); toy-sized in the short profile, >= 1 GiB of weights in the full.
_SMALL_GENAI = ModelSpec("phi3-tiny", "genai", size=2 * _MiB)
_GENAI_1G = ModelSpec("phi3-1g", "genai", size=2**30)
PROFILES: dict[str, Profile] = {
    "short": Profile(
        name="short",
        models=(ModelSpec("mlp", "mlp"), ModelSpec("part", "part"), _SMALL_LLM, _SMALL_GENAI),
        modes=("local", "fuse", "fsspec", "upstream"),
        states=("cold", "warm", "hot"),
        repeats=3,
        inference_runs=10,
        access_models=(_SMALL_LLM, ModelSpec("st-16m", "safetensors", 16 * _MiB, "float16"),
                       ModelSpec("pt-16m", "torch", 16 * _MiB, "float16")),
        timeout=120.0,
    ),
    "full": Profile(
        name="full",
        models=(ModelSpec("mlp", "mlp"), ModelSpec("part", "part"),
                ModelSpec("llm-2g", "llm", size=2 * 2**30, dtype="float32"),
                ModelSpec("st-2g", "safetensors", size=2 * 2**30, dtype="float16"),
                _GENAI_1G),
        modes=("local", "fuse", "fsspec", "upstream", "get", "download", "oci"),
        states=("cold", "warm", "hot"),
        networks=("loopback", "wan-20ms-1g"),
        network_models=("part", "llm-2g", "phi3-1g"),
        network_modes=("fuse", "fsspec", "upstream", "get", "download"),
        repeats=3,
        inference_runs=10,
        threads=2,
        origin="nginx",
        access_models=(ModelSpec("llm-2g", "llm", size=2 * 2**30, dtype="float32"),
                       ModelSpec("st-2g", "safetensors", size=2 * 2**30, dtype="float16"),
                       ModelSpec("pt-256m", "torch", 256 * _MiB, "float16")),
        concurrency=(1, 4),
        concurrency_model="llm-512m",
    ),
}
EXTRA_MODELS = {"llm-512m": ModelSpec("llm-512m", "llm", size=512 * _MiB, dtype="float32")}
"""Models a profile may name (``concurrency_model``) without measuring them in the matrix."""


def default_workdir(out_dir: str | os.PathLike[str]) -> Path:
    """Where models, the repository and caches live between runs: ``OUT/work``.

    Beside the report, so a run never fills a home folder unasked (generated models reach
    several GiB) and deleting the report folder deletes everything; ``--work`` shares one
    folder between report folders.
    """
    return Path(out_dir) / "work"


def choices() -> dict[str, set[str]]:
    """The names a profile's ``modes``, ``states`` and ``networks`` may hold (``bench run``)."""
    from cvmfs_ml.bench.modes import MODES
    from cvmfs_ml.testing.netem import WAN_PROFILES

    return {"modes": {*MODES, "upstream"}, "states": {"cold", "warm", "hot"},
            "networks": set(WAN_PROFILES)}
