"""safetensors: files written by the safetensors package, and hand-broken headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect, safetensors_format
from cvmfs_ml.models.formats.base import Source

from ._helpers import CountingFile

st_numpy = pytest.importorskip("safetensors.numpy")


def _write(path: Path) -> None:
    st_numpy.save_file(
        {
            "embed.weight": np.ones((10, 4), np.float32),
            "layer.bias": np.zeros(4, np.float16),
            "steps": np.array([3], np.int64),
            "mask": np.zeros((2, 2), np.bool_),
        },
        str(path),
        metadata={"format": "pt", "note": "tiny"},
    )


def _raw(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def test_file_written_by_safetensors_is_described(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _write(path)
    assert detect(path) == "safetensors"
    desc = describe(path)
    assert desc.format == "safetensors"
    assert desc.framework == "pytorch"
    assert desc.metadata == {"format": "pt", "note": "tiny"}
    assert desc.tensors == 4
    assert desc.parameters == 40 + 4 + 1 + 4
    assert desc.dtypes == {"F32": 40, "F16": 4, "I64": 1, "BOOL": 4}
    shapes = {w.name: (w.dtype, w.shape) for w in desc.weights}
    assert shapes["embed.weight"] == ("F32", (10, 4))
    assert shapes["steps"] == ("I64", (1,))
    assert desc.to_json()["weights"][0]["shape"] in ([2, 2], [10, 4], [4], [1])


def test_detection_ignores_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    _write(path)
    assert detect(path) == "safetensors"
    other = tmp_path / "notes.safetensors"
    other.write_text("just some text that is not a model")
    assert detect(other) is None


def test_huge_declared_tensor_reads_only_the_header(tmp_path: Path) -> None:
    rows, cols = 32_768, 16_384  # 1 GiB of BF16, left as a sparse hole
    nbytes = rows * cols * 2
    header = {"w": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, nbytes]}}
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(_raw(header))
        f.truncate(f.tell() + nbytes)
    counting = CountingFile(path)
    with counting:
        desc = safetensors_format.describe(counting, Source(str(path)))
    assert desc.parameters == rows * cols
    assert counting.bytes_read < 1 << 20


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"\x10\x00\x00", "truncated safetensors header"),
        (struct.pack("<Q", 1 << 40) + b'{"a": 1}', "exceeds"),
        (struct.pack("<Q", 500) + b'{"a": {}}', "exceeds the file"),
        (struct.pack("<Q", 4) + b"[1] ", "does not start with '{'"),
        (struct.pack("<Q", 5) + b'{"a":', "not valid JSON"),
        (
            _raw({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "needs 8 bytes",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "bad shape",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                },
                b"\0" * 12,
            ),
            "gap",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlaps",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "truncated",
        ),
        (
            _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9),
            "data region has 9 bytes",
        ),
        (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
    ],
)
def test_malformed_headers_are_rejected(tmp_path: Path, blob: bytes, reason: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert reason in str(info.value)
    assert str(path) in str(info.value)


def test_reads_through_an_fsspec_filesystem(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    path = tmp_path / "model.safetensors"
    _write(path)
    fs = fsspec.filesystem("memory")
    fs.pipe("/repo/model.safetensors", path.read_bytes())
    assert detect("/repo/model.safetensors", opener=fs.open) == "safetensors"
    desc = describe("/repo/model.safetensors", fs.open)
    assert desc.parameters == 49
