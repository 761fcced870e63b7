"""The particle-physics benchmark models: Particle Transformer and ParticleNet (random weights).

They are the models a CVMFS site actually serves to grid jobs: a few MB, loaded by thousands of
jobs at once. Built with weaver-core's own modules and exported exactly as
particle-transformer.md describes (``torch.manual_seed`` first, ``for_inference=True``, trace on
batch 2, ``dynamo=False``, opset 17), so the files match the measured reference (ParT:
2,143,486 parameters, 8,747,515 bytes, byte-identical for a given seed).

torch and weaver-core are optional: importing this module is cheap, and building a model
without them raises an ImportError that says how to install them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "INSTALL_HINT",
    "build_particle_transformer",
    "build_particlenet",
    "make_particle_transformer_onnx",
    "make_particlenet_onnx",
    "particle_inputs",
]

INSTALL_HINT = "pip install torch==2.13.0 && pip install --no-deps weaver-core==0.5.3"
_N_FEATURES = 17  # the JetClass "full" input set
_PARTICLE_INPUTS = ("pf_points", "pf_features", "pf_vectors", "pf_mask")


def _torch() -> Any:
    try:
        import torch
        import weaver.nn.model  # noqa: F401 - fail here, not halfway through a build
    except ImportError as exc:
        raise ImportError(
            f"the physics models need torch and weaver-core; install them with: {INSTALL_HINT}"
        ) from exc
    return torch


def _wrap(torch: Any, net: Any, call: str) -> Any:
    """The four-input wrapper of the recipe; exporters then drop the inputs a model ignores."""

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mod = net

        def forward(self, pf_points: Any, pf_features: Any, pf_vectors: Any,
                    pf_mask: Any) -> Any:
            if call == "part":
                return self.mod(pf_features, v=pf_vectors, mask=pf_mask)
            return self.mod(pf_points, pf_features, pf_mask)

    return Wrapper().eval()


def build_particle_transformer(seed: int = 42) -> Any:
    """The JetClass "full" ParT (upstream config, dropouts 0) as an eval-mode torch module."""
    torch = _torch()
    from weaver.nn.model.ParticleTransformer import ParticleTransformer

    torch.manual_seed(seed)
    net = ParticleTransformer(
        input_dim=_N_FEATURES, num_classes=10, pair_input_dim=4, use_pre_activation_pair=False,
        embed_dims=[128, 512, 128], pair_embed_dims=[64, 64, 64], num_heads=8, num_layers=8,
        num_cls_layers=2,
        cls_block_params={"dropout": 0, "attn_dropout": 0, "activation_dropout": 0},
        fc_params=[], activation="gelu", for_inference=True,
    )
    return _wrap(torch, net, "part")


def build_particlenet(seed: int = 42) -> Any:
    """The JetClass ParticleNet (370,156 parameters) as an eval-mode torch module."""
    torch = _torch()
    from weaver.nn.model.ParticleNet import ParticleNet

    torch.manual_seed(seed)
    net = ParticleNet(
        input_dims=_N_FEATURES, num_classes=10,
        conv_params=[(16, (64, 64, 64)), (16, (128, 128, 128)), (16, (256, 256, 256))],
        fc_params=[(256, 0.1)], use_fusion=False, use_fts_bn=True, use_counts=True,
        for_inference=True,
    )
    return _wrap(torch, net, "pnet")


def _export(module: Any, path: str | os.PathLike[str]) -> Path:
    """Trace on batch 2 (a batch-1 trace breaks other batch sizes), opset 17, dynamo off."""
    import onnx

    torch = _torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = particle_inputs(2, 128, np.random.default_rng(0))
    inputs = tuple(torch.from_numpy(arrays[name]) for name in _PARTICLE_INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(
            module, inputs, str(path), dynamo=False, opset_version=17,
            input_names=list(_PARTICLE_INPUTS), output_names=["softmax"],
            dynamic_axes={**{n: {0: "N", 2: "P"} for n in _PARTICLE_INPUTS},
                          "softmax": {0: "N"}},
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def make_particle_transformer_onnx(path: str | os.PathLike[str], seed: int = 42) -> Path:
    """Export ParT to ``path``: inputs pf_features [N,17,P], pf_vectors [N,4,P], pf_mask [N,1,P].

    The output is ``softmax [N,10]``. Zero-padded pf_vectors give NaN in onnxruntime (the
    exported Atan2 is atan(y/x)), so feed wrap-padded inputs such as :func:`particle_inputs`.
    """
    return _export(build_particle_transformer(seed), path)


def make_particlenet_onnx(path: str | os.PathLike[str], seed: int = 42) -> Path:
    """Export ParticleNet: inputs pf_points [N,2,P], pf_features [N,17,P], pf_mask [N,1,P]."""
    return _export(build_particlenet(seed), path)


def particle_inputs(n: int, p: int, rng: np.random.Generator,
                    n_features: int = _N_FEATURES) -> dict[str, np.ndarray]:
    """Plausible jets: 3/4 real particles, the rest masked and *wrap-padded*.

    Padding repeats real particles (as the JetClass data config does) instead of zeros,
    because ParT's exported Atan2 gives NaN on all-zero four-vectors. Features and points of
    padded particles are zero, as weaver produces them.
    """
    n_real = max(1, (3 * p) // 4)
    mask = np.zeros((n, 1, p), np.float32)
    mask[:, :, :n_real] = 1.0
    pt = rng.exponential(20.0, (n, n_real)) + 1.0
    eta = rng.normal(0.0, 0.4, (n, n_real))
    phi = rng.normal(0.0, 0.4, (n, n_real))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2 + 0.14**2)
    wrap = np.arange(p) % n_real
    vectors = np.stack([px, py, pz, energy], axis=1)[:, :, wrap].astype(np.float32)
    points = np.stack([eta, phi], axis=1)[:, :, wrap].astype(np.float32) * mask
    features = rng.normal(0.0, 1.0, (n, n_features, p)).astype(np.float32) * mask
    return {"pf_points": points, "pf_features": features, "pf_vectors": vectors, "pf_mask": mask}
