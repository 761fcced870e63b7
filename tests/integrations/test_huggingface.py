"""transformers ``from_pretrained`` on models in CVMFS, offline (``HF_HUB_OFFLINE=1``).

A tiny BERT with random weights (config + safetensors, as ``save_pretrained`` writes them) is
published as a model version, and also as a Hugging Face hub cache (``models--org--name/``)
under ``/hf-cache``. Loaded through the mount, through ``cvmfs-ml model path``, and by repo id
with ``HF_HUB_CACHE`` pointing into the mount, it must give the original's logits exactly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model

from .conftest import FQRN, Site

pytestmark = pytest.mark.service

COMMIT = "0123456789abcdef0123456789abcdef01234567"

FORWARD = """
import sys, numpy as np, torch
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1]).eval()
ids = torch.arange(1, 17).reshape(2, 8) % 90
with torch.no_grad():
    np.save(sys.argv[2], model(input_ids=ids).logits.numpy())
"""


def _tiny_bert(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(folder, safe_serialization=True)


def _hub_cache(snapshot: Path, cache: Path, repo_id: str) -> None:
    """``cache/models--org--name/{refs/main, snapshots/<commit>/...}`` (blobs are optional)."""
    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    target = base / "snapshots" / COMMIT
    target.mkdir(parents=True)
    for item in snapshot.iterdir():
        (target / item.name).write_bytes(item.read_bytes())


def forward(model: str | Path, out: Path, env: dict[str, str]) -> np.ndarray:
    result = subprocess.run(
        [sys.executable, "-c", FORWARD, str(model), str(out)],
        env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


def test_from_pretrained_through_mount_model_path_and_hub_cache(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    original = tmp_path / "tiny-bert"
    _tiny_bert(original)
    publish_model(site.publisher, original, ModelRef("hf", "tiny-bert", "1.0"))
    hub = tmp_path / "hub"
    _hub_cache(original, hub, "org/tiny-bert")
    subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", "repo", "publish",
                    str(site.publisher.repo_dir), str(hub), "--at", "/hf-cache"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    env = site.env
    expected = forward(original, tmp_path / "expected.npy", env)

    # `model path` without a mount: a verified copy from the client's cache
    printed = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "model", "path", f"cvmfs://{FQRN}/hf/tiny-bert:latest"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()  # fmt: skip
    assert "materialised" in printed
    np.testing.assert_array_equal(forward(printed, tmp_path / "copy.npy", env), expected)

    mount_site()
    in_mount = site.mounts / FQRN / "hf" / "tiny-bert" / "latest"
    np.testing.assert_array_equal(forward(in_mount, tmp_path / "mount.npy", env), expected)
    # the hub-cache recipe: HF_HUB_CACHE inside the mount, the model by repo id, offline
    hub_env = {**env, "HF_HUB_CACHE": str(site.mounts / FQRN / "hf-cache")}
    by_id = forward("org/tiny-bert", tmp_path / "hub.npy", hub_env)
    np.testing.assert_array_equal(by_id, expected)
