"""GGUF: files written by the gguf package (gguf.GGUFWriter), and broken headers."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect, gguf_format
from cvmfs_ml.models.formats.base import Source

from ._helpers import CountingFile

gguf = pytest.importorskip("gguf")


def _write(path: Path, *, big_endian: bool = False, vocab: int = 300) -> None:
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), arch="llama", endianess=endian)
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_scores([0.5] * vocab)
    w.add_array("test.small", [1, 2, 3])
    w.add_string("test.text", "héllo")
    w.add_bool("test.flag", True)
    q = gguf.quants.quantize(
        np.linspace(-1, 1, 8 * 64, dtype=np.float32).reshape(8, 64),
        gguf.GGMLQuantizationType.Q8_0,
    )
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float16))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("big_endian", [False, True])
def test_writer_output_is_described(tmp_path: Path, big_endian: bool) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path, big_endian=big_endian)
    assert detect(path) == "gguf"
    desc = describe(path)
    assert desc.format == "gguf"
    meta = desc.metadata
    assert meta["version"] == 3
    assert meta["byte_order"] == ("big" if big_endian else "little")
    assert meta["architecture"] == "llama"
    assert meta["name"] == "tiny-llama"
    assert meta["quantization"] == "Q8_0"
    assert meta["context_length"] == 256
    assert meta["kv"]["test.small"] == [1, 2, 3]
    assert meta["kv"]["test.text"] == "héllo"
    assert meta["kv"]["test.flag"] is True
    assert meta["kv"]["tokenizer.ggml.tokens"] == {
        "type": "array",
        "element_type": "string",
        "length": 300,
    }
    assert desc.tensors == 3
    assert desc.parameters == 8 * 64 + 16 * 32 + 32
    assert desc.dtypes == {"Q8_0": 512, "F16": 512, "F32": 32}
    shapes = {w.name: (w.dtype, w.shape) for w in desc.weights}
    assert shapes["token_embd.weight"] == ("F16", (16, 32))
    assert shapes["blk.0.attn_q.weight"] == ("Q8_0", (8, 64))


def test_agrees_with_the_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path)
    reader = gguf.GGUFReader(str(path))
    desc = describe(path)
    ours = {w.name: (w.dtype, tuple(reversed(w.shape))) for w in desc.weights}
    theirs = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    assert ours == theirs


def test_tables_match_the_gguf_package() -> None:
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert gguf_format.GGML_TYPES[int(qtype)] == (qtype.name, block, size)
    for ftype in gguf.LlamaFileType:
        assert gguf_format.FILE_TYPES[int(ftype)] == (
            ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        )


def test_big_vocabulary_is_skipped_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    _write(path, vocab=50_000)
    f = CountingFile(path)
    with f:
        desc = gguf_format.describe(f, Source(str(path)))
    assert desc.metadata["kv"]["tokenizer.ggml.scores"]["length"] == 50_000
    # Header-only: the tensor data section at the end is never read.
    assert f.bytes_read <= path.stat().st_size


def _header(version: int = 3, magic: bytes = b"GGUF", tensors: int = 0, kvs: int = 0) -> bytes:
    return magic + struct.pack("<IQQ", version, tensors, kvs)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (_header(magic=b"GGUX"), "bad GGUF magic"),
        (_header(version=99), "unsupported GGUF version 99"),
        (b"GGUF\x03\x00", "truncated"),
        (_header(kvs=1) + struct.pack("<Q", 1000) + b"key", "runs past end of file"),
        (_header(tensors=1 << 40), "too many"),
        (
            _header(kvs=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 42) + b"\0" * 8,
            "unknown value type 42",
        ),
    ],
)
def test_malformed_headers_are_rejected(tmp_path: Path, blob: bytes, reason: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert reason in str(info.value)
    assert str(path) in str(info.value)


def test_bad_version_is_not_detected(tmp_path: Path) -> None:
    path = tmp_path / "v99.bin"
    path.write_bytes(_header(version=99))
    assert detect(path) is None


def test_truncated_tensor_data_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ModelFormatError, match="truncated"):
        describe(path)
