"""The generative LLM case: a Phi-3-architecture decoder with random weights, run by
onnxruntime-genai, as in the field report that started this project (Phi-4-mini ONNX: over
30 s for a first load from CVMFS against about 10 s from local disk).

:func:`make_phi3_genai` builds the model locally, nothing downloaded: a ``transformers``
``Phi3Config`` sized to the requested weight bytes, random weights (seeded), a tiny word-level
tokenizer, then onnxruntime-genai's own model builder (the tool that produced the field
report's model) exports ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json``.
:class:`GreedyGenerator` is the benchmark's "inference": greedy decoding of a fixed number of
tokens from a fixed prompt of token ids, so every storage mode must produce the same tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cvmfs_ml.errors import ConfigError

__all__ = ["PROMPT_IDS", "GreedyGenerator", "gpu_note", "make_phi3_genai", "phi3_shape"]

PROMPT_IDS = (1, 5, 9, 33, 7, 11, 42, 3)
"""The prompt, as token ids (the benchmark measures loading and decoding, not tokenising)."""


def phi3_shape(total_bytes: int) -> dict[str, int]:
    """Phi-3 hyper-parameters whose fp32 weights come to about ``total_bytes``.

    Tiny budgets (tests, the short profile) get a toy vocabulary; from about 64 MiB on, Phi-3's
    real vocabulary (32064) and a head size of 64, with layers added until the budget is met.
    """
    params = max(total_bytes // 4, 1)
    if total_bytes < 64 * 2**20:
        vocab, hidden = 512, 128
    else:
        vocab, hidden = 32064, 1024 if total_bytes < 4 * 2**30 else 2048
    inter = hidden * 8 // 3 // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 32,
            "num_key_value_heads": hidden // 32}


def gpu_note(dev: str | os.PathLike[str] = "/dev") -> str:
    """What the report says about the generative case on a GPU (issue 13: "where a CUDA GPU
    is present, the same on the GPU; skipped, and said so, where none is").

    The suite builds and runs the model for the CPU only (``-e cpu``); a GPU run needs a CUDA
    build of the model and of onnxruntime-genai, which no machine of this project had.
    """
    devices = sorted(p.name for p in Path(dev).glob("nvidia[0-9]*"))
    if not devices:
        return ("GPU: no CUDA device here (no /dev/nvidia*); the generative LLM case ran on "
                "the CPU only")
    return (f"GPU: CUDA device(s) {', '.join(devices)} present, but the suite runs the "
            "generative LLM case on the CPU only (no CUDA run is built yet)")


def _tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with ``vocab_size`` entries (builder and loaders expect one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def make_phi3_genai(folder: str | os.PathLike[str], total_bytes: int, *, seed: int = 0,
                    timeout: float = 1800.0) -> Path:
    """Build the model into ``folder`` (ONNX fp32 for the CPU); returns ``folder``."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    shape = phi3_shape(total_bytes)
    with tempfile.TemporaryDirectory(prefix="phi3-", dir=out.parent) as tmp:
        hf = Path(tmp) / "hf"
        torch.manual_seed(seed)
        config = Phi3Config(**shape, max_position_embeddings=512,
                            original_max_position_embeddings=512, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        _save_quietly(Phi3ForCausalLM(config), hf)
        _tokenizer(hf, shape["vocab_size"])
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # The builder picks the architecture from the model name; the weights come from -i.
        proc = subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m",
             "microsoft/Phi-3-mini-4k-instruct", "-i", str(hf), "-o", str(out), "-p", "fp32",
             "-e", "cpu", "-c", str(Path(tmp) / "cache")],
            capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not (out / "genai_config.json").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"onnxruntime-genai's builder failed: {tail[0]}")
    (out / "phi3-shape.json").write_text(json.dumps(shape) + "\n")
    return out


def _save_quietly(model: Any, folder: Path) -> None:
    """``save_pretrained`` without transformers' "Writing model shards" bar on stderr: the
    benchmark has its own progress lines (and ``--quiet`` promises none)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class GreedyGenerator:
    """Greedy decoding of ``new_tokens`` tokens after :data:`PROMPT_IDS`.

    ``run()`` returns the generated ids (the output whose digest must match across storage
    modes); ``first_token_s`` is the time from the start of the last run to its first token.
    """

    def __init__(self, folder: str | os.PathLike[str], new_tokens: int = 16) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(str(folder))
        self.new_tokens = new_tokens
        self.first_token_s: float | None = None

    def run(self) -> list[np.ndarray]:
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(PROMPT_IDS) + self.new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        started = time.perf_counter()
        generator.append_tokens(list(PROMPT_IDS))
        tokens: list[int] = []
        self.first_token_s = None
        while not generator.is_done():
            generator.generate_next_token()
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - started
            tokens.append(int(generator.get_next_tokens()[0]))
        return [np.asarray(tokens, dtype=np.int64)]


def materialise(blobs: dict[str, bytes]) -> Path:
    """Write in-memory files to a private folder (RAM-backed where possible), for runtimes
    that load only from a folder; the caller's process removes it at exit."""
    import atexit

    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="cvmfs-ml-blobs-", dir=base))
    atexit.register(shutil.rmtree, folder, True)
    for name, data in blobs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def describe(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The model's shape (what :func:`make_phi3_genai` recorded), for reports."""
    try:
        return json.loads((Path(folder) / "phi3-shape.json").read_text())
    except (OSError, ValueError):
        return {}
