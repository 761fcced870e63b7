"""Benchmark models, generated on the spot instead of downloaded.

The suite must not depend on a model hub, so every model it measures is built here from a seed:

* :func:`make_mlp_onnx` - an MLP of under a MiB with inline weights (the "small file" case).
* :func:`make_llm_onnx` - an LLM-shaped transformer stack whose float16 (or float32) weights
  live in ONNX external data, sized to any total (2 GiB by default). onnxruntime really runs
  it, so a load benchmark exercises the same mmap/page-fault path as a real checkpoint
  (performance-notes.md §7).
* :func:`make_safetensors` - the same tensors as one ``.safetensors`` file.
* :func:`make_particle_transformer_onnx` / :func:`make_particlenet_onnx` - the physics models of
  particle-transformer.md (random weights; need torch and weaver-core; defined in
  :mod:`cvmfs_ml.bench.physics` and re-exported here).
* :func:`fine_tune_variant` - a copy of a model with a few tensors changed, for dedup sweeps.
* :func:`example_inputs` - valid, NaN-free inputs for any of the ONNX models above
  (defined in :mod:`cvmfs_ml.bench.inputs` and re-exported here).

Big models are written tensor by tensor in bounded blocks, so generating 2 GiB needs tens of
MiB of memory. Gaussian float16/bfloat16 weights come from an inverse-CDF table indexed by raw
random bits: the values follow N(0, std) exactly at 16-bit precision (and compress like real
weights, ~1.08x with zlib), at several times the speed of ``standard_normal`` plus a cast.
Every tensor has its own random stream derived from ``(seed, tensor index)``, so the bytes of
a tensor do not depend on which other tensors exist - which keeps dedup experiments honest.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from cvmfs_ml.bench.inputs import example_inputs, require_onnx
from cvmfs_ml.bench.physics import (
    make_particle_transformer_onnx,
    make_particlenet_onnx,
)

__all__ = [
    "FineTuneResult",
    "LlmLayout",
    "TensorSpec",
    "example_inputs",
    "fine_tune_variant",
    "llm_layout",
    "make_llm_onnx",
    "make_mlp_onnx",
    "make_particle_transformer_onnx",
    "make_particlenet_onnx",
    "make_safetensors",
]

_BLOCK_ELEMS = 8 * 2**20  # 16 MiB of float16 per generation step: bounded memory
_ALIGN = 4096  # onnx aligns large external tensors to the mmap granularity; so do we
_ALIGN_THRESHOLD = 2**20
_INIT_STD = 0.02
_OPSET = 20  # Gelu is a primitive operator from opset 20 on
_IR_VERSION = 10

# dtype name -> (numpy storage dtype, ONNX TensorProto enum name, safetensors name)
_DTYPES: dict[str, tuple[np.dtype[Any], str, str]] = {
    "float16": (np.dtype(np.float16), "FLOAT16", "F16"),
    "float32": (np.dtype(np.float32), "FLOAT", "F32"),
    "bfloat16": (np.dtype(np.uint16), "BFLOAT16", "BF16"),  # stored as raw bits
}
_ST_TO_DTYPE = {st: name for name, (_, _, st) in _DTYPES.items()}


def _dtype_info(dtype: str) -> tuple[np.dtype[Any], str, str]:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}") from None


# --------------------------------------------------------------------------------------------
# random weights


@functools.lru_cache(maxsize=16)
def _quantile_table(dtype: str, mean: float, std: float) -> np.ndarray:
    """65536 equiprobable quantiles of N(mean, std), stored as ``dtype`` (bf16 as raw bits)."""
    dist = NormalDist(mean, std)
    probs = (np.arange(65536, dtype=np.float64) + 0.5) / 65536.0
    values = np.array([dist.inv_cdf(p) for p in probs], dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16)
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(values)
    raise ValueError(dtype)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round-half-to-even) and return the 16-bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _gaussian_blocks(
    n: int, dtype: str, seed: int, index: int, *, mean: float = 0.0, std: float = _INIT_STD
) -> Iterator[np.ndarray]:
    """Yield ``n`` N(mean, std) values in blocks of at most ``_BLOCK_ELEMS`` elements."""
    rng = np.random.default_rng([seed, index])
    table = None if dtype == "float32" else _quantile_table(dtype, mean, std)
    done = 0
    while done < n:
        k = min(_BLOCK_ELEMS, n - done)
        if table is None:
            block = rng.standard_normal(k, dtype=np.float32)
            block *= np.float32(std)
            block += np.float32(mean)
        else:
            raw = rng.bit_generator.random_raw((k + 3) // 4)
            block = table[raw.view(np.uint16)[:k]]
        yield block
        done += k


# --------------------------------------------------------------------------------------------
# layout of an LLM-shaped model


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor: its name, shape (ONNX orientation: ``[in, out]`` for projections)."""

    name: str
    shape: tuple[int, ...]
    mean: float = 0.0  # layer-norm scales are centred on 1, everything else on 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LlmLayout:
    """The architecture chosen to reach a byte budget; shared by ONNX and safetensors outputs."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    dtype: str
    tensors: tuple[TensorSpec, ...] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of all weights (without alignment padding or headers)."""
        return sum(t.numel for t in self.tensors) * _dtype_info(self.dtype)[0].itemsize


def llm_layout(total_bytes: int, hidden: int | None = None, dtype: str = "float16") -> LlmLayout:
    """Choose hidden size, depth and vocabulary so the weights total ``total_bytes``.

    Each block holds q/k/v/o projections (4 h^2) and an MLP with 4h intermediate (8 h^2) plus
    two layer norms. The hidden size defaults to the largest power of two that still allows
    about eight blocks; the depth is then the number of whole blocks that fit, and the
    vocabulary of the output projection absorbs the remainder, so the total is matched to
    within ``hidden`` elements.
    """
    itemsize = _dtype_info(dtype)[0].itemsize
    params = max(1, total_bytes // itemsize)
    if hidden is None:
        hidden = 64
        while hidden < 8192 and 12 * (2 * hidden) ** 2 * 8 <= params:
            hidden *= 2
    if hidden < 64 or hidden % 64:
        raise ValueError(f"hidden must be a positive multiple of 64 (head size), not {hidden}")
    h = hidden
    per_block = 12 * h * h + 4 * h
    final_norm = 2 * h
    vocab_min = int(min(32000, max(64, params // (8 * h)))) // 64 * 64
    layers = max(1, (params - final_norm - h * vocab_min) // per_block)
    vocab = max(vocab_min, (params - layers * per_block - final_norm) // h)
    tensors: list[TensorSpec] = []
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [
            TensorSpec(f"{p}.input_layernorm.weight", (h,), mean=1.0),
            TensorSpec(f"{p}.input_layernorm.bias", (h,)),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (h, h)),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (h, h)),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (h, h)),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (h, h)),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), mean=1.0),
            TensorSpec(f"{p}.post_attention_layernorm.bias", (h,)),
            TensorSpec(f"{p}.mlp.up_proj.weight", (h, 4 * h)),
            TensorSpec(f"{p}.mlp.down_proj.weight", (4 * h, h)),
        ]
    tensors += [
        TensorSpec("model.norm.weight", (h,), mean=1.0),
        TensorSpec("model.norm.bias", (h,)),
        TensorSpec("lm_head.weight", (h, vocab)),
    ]
    return LlmLayout(h, layers, h // 64, 4 * h, vocab, dtype, tuple(tensors))


class _OverlappedWriter:
    """A file whose writes run on a helper thread, so the next block is generated meanwhile.

    At most one write is in flight, so memory stays at about two blocks.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-writer")
        self._pending: Future[int] | None = None

    def write(self, data: bytes | memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._file.write, data)

    def __enter__(self) -> _OverlappedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pending is not None:
                self._pending.result()
        finally:
            self._pool.shutdown()
            self._file.close()


def _write_tensor(w: _OverlappedWriter, spec: TensorSpec, dtype: str, seed: int,
                  index: int) -> int:
    written = 0
    for block in _gaussian_blocks(spec.numel, dtype, seed, index, mean=spec.mean):
        w.write(memoryview(block).cast("B"))  # the memoryview keeps the block alive
        written += block.nbytes
    return written


# --------------------------------------------------------------------------------------------
# ONNX models


def _finish_model(graph: Any) -> Any:
    onnx = require_onnx()
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", _OPSET)],
        producer_name="cvmfs-ml.bench",
    )
    model.ir_version = _IR_VERSION
    return model


def make_mlp_onnx(path: str | os.PathLike[str], hidden: int = 256, layers: int = 3,
                  seed: int = 0) -> Path:
    """Write a small float32 MLP (``x [batch, hidden] -> y [batch, hidden]``) with inline weights.

    It stands for the many small models (taggers, calibrations) that fit in one CVMFS object.
    """
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "x"
    for i in range(layers):
        w = (rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)).astype(np.float32)
        b = (rng.standard_normal(hidden) * _INIT_STD).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(b, f"fc{i}.bias")]
        nodes.append(helper.make_node("MatMul", [cur, f"fc{i}.weight"], [f"mm{i}"]))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"],
                                      [out if i == layers - 1 else f"a{i}"]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        cur = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        initializer=inits,
    )
    model = _finish_model(graph)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _llm_graph(layout: LlmLayout, initializers: list[Any]) -> Any:
    """The computation: pre-LN transformer blocks over ``hidden_states`` and an output head."""
    from onnx import TensorProto, helper, numpy_helper

    onnx_type = getattr(TensorProto, _dtype_info(layout.dtype)[1])
    np_dtype = np.float16 if layout.dtype == "float16" else np.float32
    h, nh = layout.hidden, layout.heads
    hd = h // nh
    consts = [
        numpy_helper.from_array(np.array([0, 0, nh, hd], np.int64), "const.heads_shape"),
        numpy_helper.from_array(np.array([0, 0, h], np.int64), "const.hidden_shape"),
        numpy_helper.from_array(np.array(1.0 / math.sqrt(hd), np_dtype), "const.attn_scale"),
    ]
    nodes: list[Any] = []

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = "hidden_states"
    for i in range(layout.layers):
        p = f"model.layers.{i}"
        n1 = node("LayerNormalization", [x, f"{p}.input_layernorm.weight",
                                         f"{p}.input_layernorm.bias"], f"{p}/ln1", axis=-1)
        heads = {}
        for proj in "qkv":
            y = node("MatMul", [n1, f"{p}.self_attn.{proj}_proj.weight"], f"{p}/{proj}")
            y = node("Reshape", [y, "const.heads_shape"], f"{p}/{proj}_heads")
            perm = [0, 2, 3, 1] if proj == "k" else [0, 2, 1, 3]
            heads[proj] = node("Transpose", [y], f"{p}/{proj}_t", perm=perm)
        s = node("MatMul", [heads["q"], heads["k"]], f"{p}/scores")
        s = node("Mul", [s, "const.attn_scale"], f"{p}/scores_scaled")
        a = node("Softmax", [s], f"{p}/probs", axis=-1)
        a = node("MatMul", [a, heads["v"]], f"{p}/ctx")
        a = node("Transpose", [a], f"{p}/ctx_t", perm=[0, 2, 1, 3])
        a = node("Reshape", [a, "const.hidden_shape"], f"{p}/ctx_merged")
        a = node("MatMul", [a, f"{p}.self_attn.o_proj.weight"], f"{p}/attn_out")
        x = node("Add", [x, a], f"{p}/resid1")
        n2 = node("LayerNormalization", [x, f"{p}.post_attention_layernorm.weight",
                                         f"{p}.post_attention_layernorm.bias"], f"{p}/ln2",
                  axis=-1)
        m = node("MatMul", [n2, f"{p}.mlp.up_proj.weight"], f"{p}/up")
        m = node("Gelu", [m], f"{p}/gelu")
        m = node("MatMul", [m, f"{p}.mlp.down_proj.weight"], f"{p}/down")
        x = node("Add", [x, m], f"{p}/resid2")
    x = node("LayerNormalization", [x, "model.norm.weight", "model.norm.bias"], "final_norm",
             axis=-1)
    node("MatMul", [x, "lm_head.weight"], "logits")
    return helper.make_graph(
        nodes, "llm_like",
        [helper.make_tensor_value_info("hidden_states", onnx_type, ["batch", "seq", h])],
        [helper.make_tensor_value_info("logits", onnx_type, ["batch", "seq", layout.vocab])],
        initializer=consts + initializers,
    )


def _external_tensor(spec: TensorSpec, onnx_type: int, location: str, offset: int,
                     length: int) -> Any:
    from onnx import TensorProto

    t = TensorProto()
    t.name = spec.name
    t.data_type = onnx_type
    t.dims.extend(spec.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def make_llm_onnx(
    folder: str | os.PathLike[str],
    total_bytes: int = 2 * 2**30,
    hidden: int | None = None,
    dtype: str = "float16",
    seed: int = 0,
    external_data: bool = True,
    *,
    one_file: bool = True,
) -> Path:
    """Write ``folder/model.onnx``: an LLM-shaped model with ~``total_bytes`` of weights.

    Input ``hidden_states [batch, seq, hidden]`` and output ``logits [batch, seq, vocab]`` in
    ``dtype`` (float16 or float32: the dtypes onnxruntime's CPU MatMul supports). With
    ``external_data`` the weights go to ``model.onnx.data`` (``one_file``) or one file per
    tensor named after it - the two layouts ONNX exporters produce. The ``.data`` file is
    streamed block by block, so memory stays bounded whatever the size. Without external data
    the weights are inline, which protobuf limits to 2 GiB.

    onnxruntime's CPU provider has no float16 GEMM: it inserts Casts and, with graph
    optimisation on, folds them into float32 copies of every weight while creating the
    session (2 GiB float16: ~15 s and ~5 GB RSS). That still reads every byte, but the time is
    conversion, not I/O. To measure the lazy-mmap loading path of performance-notes.md §7
    (session creation in milliseconds, pages faulted in by the first run), use float32.
    """
    onnx = require_onnx()
    from onnx import TensorProto, numpy_helper

    if dtype not in ("float16", "float32"):
        raise ValueError("onnxruntime's CPU MatMul needs dtype float16 or float32")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = llm_layout(total_bytes, hidden, dtype)
    onnx_type = getattr(TensorProto, _dtype_info(dtype)[1])
    inits: list[Any] = []
    if not external_data:
        if layout.nbytes > 2**31 - 2**24:
            raise ValueError("inline weights must stay below protobuf's 2 GiB limit")
        for index, spec in enumerate(layout.tensors):
            data = np.concatenate(list(_gaussian_blocks(spec.numel, dtype, seed, index,
                                                        mean=spec.mean)))
            inits.append(numpy_helper.from_array(data.reshape(spec.shape), spec.name))
    elif one_file:
        location = "model.onnx.data"
        with _OverlappedWriter(folder / location) as f:
            offset = 0
            for index, spec in enumerate(layout.tensors):
                nbytes = spec.numel * _dtype_info(dtype)[0].itemsize
                if nbytes >= _ALIGN_THRESHOLD and offset % _ALIGN:
                    pad = _ALIGN - offset % _ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                length = _write_tensor(f, spec, dtype, seed, index)
                inits.append(_external_tensor(spec, onnx_type, location, offset, length))
                offset += length
    else:
        for index, spec in enumerate(layout.tensors):
            with _OverlappedWriter(folder / spec.name) as f:
                length = _write_tensor(f, spec, dtype, seed, index)
            inits.append(_external_tensor(spec, onnx_type, spec.name, 0, length))
    model = _finish_model(_llm_graph(layout, inits))
    model.metadata_props.add(key="cvmfs_ml.layout", value=json.dumps(
        {"hidden": layout.hidden, "layers": layout.layers, "heads": layout.heads,
         "vocab": layout.vocab, "dtype": dtype, "seed": seed, "weight_bytes": layout.nbytes}))
    out = folder / "model.onnx"
    out.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(out))
    return out


# --------------------------------------------------------------------------------------------
# safetensors


def make_safetensors(path: str | os.PathLike[str], total_bytes: int, dtype: str = "float16",
                     seed: int = 0, hidden: int | None = None) -> Path:
    """Write a ``.safetensors`` file with the tensors of :func:`llm_layout` (torch orientation).

    The header is written by hand and the data streamed, so memory stays bounded. Projection
    weights are stored ``[out, in]`` as PyTorch checkpoints do; names follow Hugging Face
    Llama-style checkpoints.
    """
    path = Path(path)
    layout = llm_layout(total_bytes, hidden, dtype)
    np_dtype, _, st_name = _dtype_info(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "cvmfs-ml.bench",
                                               "seed": str(seed)}}
    offset = 0
    for spec in layout.tensors:
        shape = list(reversed(spec.shape)) if len(spec.shape) == 2 else list(spec.shape)
        nbytes = spec.numel * np_dtype.itemsize
        header[spec.name] = {"dtype": st_name, "shape": shape,
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _OverlappedWriter(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for index, spec in enumerate(layout.tensors):
            _write_tensor(f, spec, dtype, seed, index)
    return path


def _safetensors_index(path: Path) -> tuple[int, dict[str, tuple[str, int, int]]]:
    """Return (data start, {name: (dtype name, begin, end)}) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, {k: (_ST_TO_DTYPE.get(v["dtype"], v["dtype"]), *v["data_offsets"])
                   for k, v in header.items()}


# --------------------------------------------------------------------------------------------
# fine-tuned variants (dedup sweeps)


@dataclass(frozen=True)
class FineTuneResult:
    """What :func:`fine_tune_variant` changed: tensor names and byte counts."""

    folder: Path
    changed: tuple[str, ...]
    changed_bytes: int
    total_bytes: int

    @property
    def changed_fraction(self) -> float:
        return self.changed_bytes / self.total_bytes if self.total_bytes else 0.0


def _tensor_ranges(folder: Path) -> list[tuple[str, Path, int, int, str]]:
    """(name, file, offset, length, dtype) of every weight in a model folder."""
    ranges: list[tuple[str, Path, int, int, str]] = []
    for st in sorted(folder.rglob("*.safetensors")):
        start, index = _safetensors_index(st)
        for name, (dt, begin, end) in index.items():
            ranges.append((f"{st.relative_to(folder)}:{name}", st, start + begin, end - begin, dt))
    onnx_names = {0: "", 1: "float32", 10: "float16", 16: "bfloat16"}
    for model_path in sorted(folder.rglob("*.onnx")):
        onnx = require_onnx()
        model = onnx.load(str(model_path), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            file = model_path.parent / info["location"]
            length = int(info["length"]) if "length" in info else file.stat().st_size
            ranges.append((t.name, file, int(info.get("offset", 0)), length,
                           onnx_names.get(t.data_type, "")))
    return ranges


def _perturb(file: Path, offset: int, length: int, dtype: str, seed: int, index: int) -> None:
    """Add N(0, 0.002) noise in place, as a short fine-tune would: almost every byte changes."""
    np_dtype = _dtype_info(dtype)[0]
    count = length // np_dtype.itemsize
    arr = np.memmap(file, dtype=np_dtype, mode="r+", offset=offset, shape=(count,))
    done = 0
    noise_dtype = "float32" if dtype == "float32" else "float16"
    for noise in _gaussian_blocks(count, noise_dtype, seed, index, std=_INIT_STD / 10):
        part = arr[done: done + noise.size]
        if dtype == "bfloat16":
            part[:] = _f32_to_bf16_bits(_bf16_bits_to_f32(part) + noise.astype(np.float32))
        else:
            part[:] = (part.astype(np.float32) + noise.astype(np.float32)).astype(np_dtype)
        done += noise.size
    arr.flush()
    del arr


def fine_tune_variant(src_folder: str | os.PathLike[str], dst_folder: str | os.PathLike[str],
                      fraction: float = 0.05, seed: int = 1) -> FineTuneResult:
    """Copy a model folder and perturb randomly chosen tensors covering ~``fraction`` of its bytes.

    Offsets and untouched tensors stay byte-identical, as after a partial fine-tune, so a
    dedup-aware store should only need the changed tensors' chunks. Works for ONNX external
    data (one file or per tensor) and safetensors files in the folder.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be within [0, 1]")
    src, dst = Path(src_folder), Path(dst_folder)
    if dst.exists():
        raise FileExistsError(dst)
    shutil.copytree(src, dst)
    ranges = [r for r in _tensor_ranges(dst) if r[4] in _DTYPES]
    total = sum(r[3] for r in ranges)
    order = np.random.default_rng(seed).permutation(len(ranges))
    changed: list[str] = []
    changed_bytes = 0
    for k in order:
        if changed_bytes >= fraction * total or fraction == 0.0:
            break
        name, file, offset, length, dt = ranges[k]
        _perturb(file, offset, length, dt, seed, int(k))
        changed.append(name)
        changed_bytes += length
    return FineTuneResult(dst, tuple(changed), changed_bytes, total)
