"""TFLite: FlatBuffers built with the ``tflite`` package's generated schema builders."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

flatbuffers = pytest.importorskip("flatbuffers")
pytest.importorskip("tflite")
# The package re-exports classes under the module names, so load the generated modules.
Buffer, Metadata, Model, SubGraph, Tensor, TensorType = (
    importlib.import_module(f"tflite.{name}")
    for name in ("Buffer", "Metadata", "Model", "SubGraph", "Tensor", "TensorType")
)

from cvmfs_ml.models.formats import ModelFormatError, describe, detect  # noqa: E402


def _ints(b: flatbuffers.Builder, start: object, values: list[int]) -> int:
    start(b, len(values))  # type: ignore[operator]
    for v in reversed(values):
        b.PrependInt32(v)
    return b.EndVector()


def _tensor(b: flatbuffers.Builder, name: str, shape: list[int], ttype: int, buf: int,
            signature: list[int] | None = None) -> int:  # fmt: skip
    name_off = b.CreateString(name)
    shape_off = _ints(b, Tensor.TensorStartShapeVector, shape)
    sig_off = _ints(b, Tensor.TensorStartShapeSignatureVector, signature) if signature else None
    Tensor.TensorStart(b)
    Tensor.TensorAddShape(b, shape_off)
    Tensor.TensorAddType(b, ttype)
    Tensor.TensorAddBuffer(b, buf)
    Tensor.TensorAddName(b, name_off)
    if sig_off is not None:
        Tensor.TensorAddShapeSignature(b, sig_off)
    return Tensor.TensorEnd(b)


def _buffer(b: flatbuffers.Builder, data: bytes) -> int:
    data_off = b.CreateByteVector(data) if data else None
    Buffer.BufferStart(b)
    if data_off is not None:
        Buffer.BufferAddData(b, data_off)
    return Buffer.BufferEnd(b)


def _model_bytes() -> bytes:
    b = flatbuffers.Builder(1024)
    tensors = [
        _tensor(b, "input", [1, 4], TensorType.TensorType.FLOAT32, 0, [-1, 4]),
        _tensor(b, "weights", [3, 4], TensorType.TensorType.INT8, 1),
        _tensor(b, "bias", [3], TensorType.TensorType.INT32, 2),
        _tensor(b, "output", [1, 3], TensorType.TensorType.FLOAT32, 0, [-1, 3]),
    ]
    SubGraph.SubGraphStartTensorsVector(b, len(tensors))
    for t in reversed(tensors):
        b.PrependUOffsetTRelative(t)
    tensors_vec = b.EndVector()
    inputs = _ints(b, SubGraph.SubGraphStartInputsVector, [0])
    outputs = _ints(b, SubGraph.SubGraphStartOutputsVector, [3])
    sg_name = b.CreateString("main")
    SubGraph.SubGraphStart(b)
    SubGraph.SubGraphAddTensors(b, tensors_vec)
    SubGraph.SubGraphAddInputs(b, inputs)
    SubGraph.SubGraphAddOutputs(b, outputs)
    SubGraph.SubGraphAddName(b, sg_name)
    subgraph = SubGraph.SubGraphEnd(b)
    buffers = [
        _buffer(b, b""),
        _buffer(b, bytes(12)),
        _buffer(b, bytes(12)),
        _buffer(b, b"2.3.0\0\0\0"),
    ]
    meta_name = b.CreateString("min_runtime_version")
    Metadata.MetadataStart(b)
    Metadata.MetadataAddName(b, meta_name)
    Metadata.MetadataAddBuffer(b, 3)
    meta = Metadata.MetadataEnd(b)
    Model.ModelStartSubgraphsVector(b, 1)
    b.PrependUOffsetTRelative(subgraph)
    subgraphs = b.EndVector()
    Model.ModelStartBuffersVector(b, len(buffers))
    for buf in reversed(buffers):
        b.PrependUOffsetTRelative(buf)
    buffers_vec = b.EndVector()
    Model.ModelStartMetadataVector(b, 1)
    b.PrependUOffsetTRelative(meta)
    meta_vec = b.EndVector()
    description = b.CreateString("built by tests")
    Model.ModelStart(b)
    Model.ModelAddVersion(b, 3)
    Model.ModelAddSubgraphs(b, subgraphs)
    Model.ModelAddBuffers(b, buffers_vec)
    Model.ModelAddMetadata(b, meta_vec)
    Model.ModelAddDescription(b, description)
    b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_tflite_model_is_described(tmp_path: Path) -> None:
    data = _model_bytes()
    assert Model.Model.GetRootAsModel(data, 0).Version() == 3  # the schema reads it back
    path = tmp_path / "net.bin"
    path.write_bytes(data)
    assert detect(path) == "tflite"
    desc = describe(path)
    assert desc.format == "tflite"
    assert desc.metadata["version"] == 3
    assert desc.metadata["description"] == "built by tests"
    assert desc.metadata["subgraphs"] == 1
    assert desc.metadata["metadata"] == {"min_runtime_version": "2.3.0"}
    assert [(t.name, t.dtype, t.shape) for t in desc.inputs] == [("input", "float32", (None, 4))]
    assert [(t.name, t.dtype, t.shape) for t in desc.outputs] == [("output", "float32", (None, 3))]
    assert desc.parameters == 15
    assert desc.dtypes == {"int8": 12, "int32": 3}
    assert desc.tensors == 2


def test_truncated_tflite_is_rejected(tmp_path: Path) -> None:
    data = _model_bytes()
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[:40])
    assert detect(path) == "tflite"
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert str(path) in str(info.value)


def test_identifier_is_required(tmp_path: Path) -> None:
    path = tmp_path / "x.tflite"
    path.write_bytes(b"\x1c\x00\x00\x00TFL2" + bytes(64))
    assert detect(path) is None
    with pytest.raises(ModelFormatError, match="TFL3"):
        describe(path)
