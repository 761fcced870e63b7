"""ONNX: models built with the onnx helper API, inline and with external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect, onnx_format
from cvmfs_ml.models.formats.base import Source

from ._helpers import CountingFile

onnx = pytest.importorskip("onnx")
TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper


def _model(weight: np.ndarray | None = None, opset: int = 17) -> onnx.ModelProto:
    w = weight if weight is not None else np.arange(12, dtype=np.float32).reshape(4, 3)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.zeros(w.shape[1], np.float32), "B"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "shape_const"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.shape[1]])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(
        graph,
        producer_name="cvmfs-ml-test",
        producer_version="1.2",
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 3)],
    )
    helper.set_model_props(model, {"author": "tests"})
    return model


def test_inline_model_is_detected_and_described(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_model(), path)
    assert detect(path) == "onnx"
    desc = describe(path)
    assert desc.format == "onnx"
    assert desc.metadata["opset_version"] == 17
    assert desc.metadata["opset"] == {"ai.onnx": 17, "ai.onnx.ml": 3}
    assert desc.metadata["producer_name"] == "cvmfs-ml-test"
    assert desc.metadata["producer_version"] == "1.2"
    assert desc.metadata["metadata_props"] == {"author": "tests"}
    assert desc.metadata["op_types"] == {"Add": 1, "MatMul": 1}
    assert [(t.name, t.dtype, t.shape) for t in desc.inputs] == [("x", "float32", ("batch", 4))]
    assert [(t.name, t.dtype, t.shape) for t in desc.outputs] == [("y", "float32", ("batch", 3))]
    assert desc.parameters == 12 + 3 + 2
    assert desc.dtypes == {"float32": 15, "int64": 2}
    assert desc.tensors == 3
    assert desc.external_data == []
    assert not desc.unsafe and desc.warnings == []
    assert {w.name: w.shape for w in desc.weights} == {"W": (4, 3), "B": (3,), "shape_const": (2,)}


def test_external_data_is_listed_and_counted_from_dims(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(
        _model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.onnx.data").exists()
    desc = describe(path)
    assert desc.external_data == ["ext.onnx.data"]
    assert desc.parameters == 17
    assert desc.warnings == []
    # The external file is never opened: removing it is reported, not fatal.
    (tmp_path / "ext.onnx.data").unlink()
    desc = describe(path)
    assert desc.parameters == 17
    assert any("missing" in w for w in desc.warnings)


def test_external_location_outside_the_directory_is_flagged(tmp_path: Path) -> None:
    model = _model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    desc = describe(path)
    assert desc.external_data == []
    assert any("outside" in w for w in desc.warnings)


def test_huge_external_tensor_is_counted_without_data(tmp_path: Path) -> None:
    big = TensorProto(name="E", data_type=TensorProto.FLOAT16, dims=[50_000, 4096])
    big.data_location = TensorProto.EXTERNAL
    for key, value in (
        ("location", "shards/big.bin"),
        ("offset", "0"),
        ("length", "409600000"),
    ):
        big.external_data.add(key=key, value=value)
    model = _model()
    model.graph.initializer.append(big)
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "big.bin").touch()  # existence is checked, contents never read
    desc = describe(path)
    assert desc.parameters == 17 + 50_000 * 4096
    assert desc.dtypes["float16"] == 50_000 * 4096
    assert desc.external_data == ["shards/big.bin"]
    assert desc.warnings == []


def test_large_inline_model_reads_only_the_graph(tmp_path: Path) -> None:
    weight = np.zeros((1024, 8192), np.float32)  # 32 MiB of raw_data
    path = tmp_path / "large.onnx"
    onnx.save(_model(weight), path)
    assert path.stat().st_size > 32 << 20
    f = CountingFile(path)
    with f:
        desc = onnx_format.describe(f, Source(str(path)))
    assert desc.parameters == 1024 * 8192 + 8192 + 2
    assert desc.inputs[0].shape == ("batch", 1024)
    assert f.bytes_read < 1 << 20, f.bytes_read


def test_truncated_protobuf_is_rejected_with_file_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    data = _model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    assert detect(path) is None
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message


def test_garbage_named_onnx_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fake.onnx"
    path.write_bytes(b"\xff\xff\xff\xff not a protobuf at all")
    assert detect(path) is None
    with pytest.raises(ModelFormatError, match=r"fake\.onnx"):
        describe(path)


def test_opset_and_ir_version_round_trip_through_onnx_checker(tmp_path: Path) -> None:
    model = _model(opset=13)
    onnx.checker.check_model(model)
    path = tmp_path / "m13.onnx"
    onnx.save(model, path)
    desc = describe(path)
    assert desc.metadata["opset_version"] == 13
    assert desc.metadata["ir_version"] == model.ir_version
