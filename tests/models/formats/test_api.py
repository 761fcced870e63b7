"""The package API: detect/describe on paths, file objects and folders; errors; JSON."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cvmfs_ml.models.formats as formats
from cvmfs_ml.errors import FormatError
from cvmfs_ml.models.formats import (
    FORMATS,
    ModelDescription,
    ModelFormatError,
    TensorInfo,
    describe,
    describe_folder,
    detect,
)

st_numpy = pytest.importorskip("safetensors.numpy")
onnx = pytest.importorskip("onnx")


def _safetensors(path: Path, rows: int = 2) -> None:
    st_numpy.save_file({"w": np.zeros((rows, 3), np.float32)}, str(path))


def _onnx(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph), path)


def test_error_type_is_a_format_error() -> None:
    err = ModelFormatError("model.onnx", "truncated")
    assert isinstance(err, FormatError) and isinstance(err, ValueError)
    assert str(err) == "model.onnx: truncated"
    assert (err.what, err.reason) == ("model.onnx", "truncated")


def test_detect_on_a_file_object_restores_the_position(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _safetensors(path)
    with open(path, "rb") as f:
        f.seek(5)
        assert detect(f) == "safetensors"
        assert f.tell() == 5
        desc = describe(f, name="m.safetensors")
    assert desc.parameters == 6


def test_detect_in_memory_bytes() -> None:
    buf = io.BytesIO(b"GGUF\x03\x00\x00\x00" + bytes(16))
    assert detect(buf) == "gguf"


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n", b"\x00" * 4096, b'{"a": 1}', b"PK\x05\x06" + bytes(18), b"%PDF-1.7\n"],
)
def test_non_models_are_not_detected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "file.onnx"
    path.write_bytes(content)
    assert detect(path) is None


def test_large_unrecognised_binary_is_rejected_after_a_few_reads(tmp_path: Path) -> None:
    from ._helpers import CountingFile

    path = tmp_path / "model.onnx_data"
    rng = np.random.default_rng(0)
    path.write_bytes(rng.standard_normal(4 << 20).astype(np.float32).tobytes())  # 16 MiB
    with CountingFile(path) as f:
        assert detect(f) is None
        assert f.bytes_read < 1 << 20


def test_content_wins_over_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    _safetensors(path)
    assert detect(path) == "safetensors"
    assert describe(path).format == "safetensors"


def test_unknown_file_is_rejected_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# not a model")
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert str(path) in str(info.value) and "not a recognised model format" in str(info.value)


def test_to_json_is_serialisable() -> None:
    desc = ModelDescription(
        format="onnx",
        inputs=[TensorInfo("x", "float32", ("batch", 3, None))],
        metadata={"raw": b"\x00\xff", "tuple": (1, 2), "nested": {"s": {1, 2}}},
        weights=[TensorInfo("w", "float32", (3,))],
    )
    out = json.loads(json.dumps(desc.to_json()))
    assert out["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, None]}]
    assert out["metadata"]["raw"] == "00ff"
    assert out["metadata"]["tuple"] == [1, 2]
    assert "weights" in out and "weights" not in desc.to_json(weights=False)


def _snapshot(root: Path) -> None:
    (root / "onnx").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["Tiny"]}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    _safetensors(root / "model-00001-of-00002.safetensors")
    _safetensors(root / "model-00002-of-00002.safetensors", rows=4)
    _onnx(root / "onnx" / "model.onnx")
    (root / "optimizer.pkl").write_bytes(pickle.dumps({"lr": 0.1}, protocol=4))
    (root / ".git").mkdir()
    (root / ".git" / "hidden.pkl").write_bytes(pickle.dumps(1, protocol=4))
    export = root / "tf" / "saved"
    export.mkdir(parents=True)
    # A SavedModel directory: meta graph with one tag, variables beside it.
    (export / "saved_model.pb").write_bytes(b"\x08\x01\x12\x0c\x0a\x07\x22\x05serve\x12\x01\x00")
    (export / "variables").mkdir()
    (export / "variables" / "variables.index").write_bytes(b"\0")


def test_describe_folder_on_a_snapshot(tmp_path: Path) -> None:
    _snapshot(tmp_path)
    found = describe_folder(tmp_path)
    assert list(found) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "onnx/model.onnx",
        "optimizer.pkl",
        "tf/saved",
    ]
    assert found["model-00002-of-00002.safetensors"].parameters == 12
    assert found["onnx/model.onnx"].format == "onnx"
    assert found["optimizer.pkl"].unsafe
    assert found["tf/saved"].format == "tf-savedmodel"
    assert found["tf/saved"].metadata["meta_graphs"][0]["tags"] == ["serve"]
    assert found["tf/saved"].external_data == ["variables/variables.index"]
    json.dumps({k: v.to_json() for k, v in found.items()})
    with pytest.raises(ModelFormatError, match="describe_folder"):
        describe(tmp_path)


def test_describe_folder_strictness(tmp_path: Path) -> None:
    _safetensors(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    _safetensors(bad)
    bad.write_bytes(bad.read_bytes()[:-4])  # data region shorter than the header says
    with pytest.raises(ModelFormatError, match=r"bad\.safetensors"):
        describe_folder(tmp_path)
    found = describe_folder(tmp_path, strict=False)
    assert found["good.safetensors"].parameters == 6
    assert found["bad.safetensors"].format == "safetensors"
    assert "bad.safetensors" in found["bad.safetensors"].warnings[0]


def test_every_detected_format_is_listed(tmp_path: Path) -> None:
    _snapshot(tmp_path)
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", "{}")
    names = {d.format for d in describe_folder(tmp_path, strict=False).values()}
    assert names <= set(FORMATS)
    assert set(FORMATS) == set(formats._DESCRIBERS)
