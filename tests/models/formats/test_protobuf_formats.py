"""TensorFlow SavedModel and Core ML: protobuf files encoded by the protobuf runtime.

Neither TensorFlow nor coremltools is a dependency, so the messages are declared here with the
field numbers of ``tensorflow/core/protobuf/{saved_model,meta_graph}.proto`` and coremltools'
``Model.proto``/``FeatureTypes.proto`` and serialised by the protobuf library itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, describe_folder, detect, savedmodel
from cvmfs_ml.models.formats.base import Source

from ._helpers import CountingFile, build_messages

pytest.importorskip("google.protobuf")

TF = build_messages(
    "tftest",
    {
        "Dim": [("size", 1, "int64", False), ("name", 2, "string", False)],
        "TensorShapeProto": [("dim", 2, "Dim", True), ("unknown_rank", 3, "bool", False)],
        "TensorInfo": [
            ("name", 1, "string", False),
            ("dtype", 2, "enum_as_int", False),
            ("tensor_shape", 3, "TensorShapeProto", False),
        ],
        "TensorInfoEntry": [("key", 1, "string", False), ("value", 2, "TensorInfo", False)],
        "SignatureDef": [
            ("inputs", 1, "TensorInfoEntry", True),
            ("outputs", 2, "TensorInfoEntry", True),
            ("method_name", 3, "string", False),
        ],
        "SignatureDefEntry": [("key", 1, "string", False), ("value", 2, "SignatureDef", False)],
        "MetaInfoDef": [
            ("meta_graph_version", 1, "string", False),
            ("tags", 4, "string", True),
            ("tensorflow_version", 5, "string", False),
        ],
        "NodeDef": [("name", 1, "string", False), ("op", 2, "string", False)],
        "GraphDef": [("node", 1, "NodeDef", True), ("blob", 9, "bytes", False)],
        "MetaGraphDef": [
            ("meta_info_def", 1, "MetaInfoDef", False),
            ("graph_def", 2, "GraphDef", False),
            ("signature_def", 5, "SignatureDefEntry", True),
        ],
        "SavedModel": [
            ("saved_model_schema_version", 1, "int64", False),
            ("meta_graphs", 2, "MetaGraphDef", True),
        ],
    },
)


def _saved_model_bytes(blob: bytes = b"") -> bytes:
    sm = TF["SavedModel"](saved_model_schema_version=1)
    mg = sm.meta_graphs.add()
    mg.meta_info_def.tags.append("serve")
    mg.meta_info_def.tensorflow_version = "2.16.1"
    mg.graph_def.node.add(name="x", op="Placeholder")
    mg.graph_def.blob = blob
    sig = mg.signature_def.add(key="serving_default").value
    sig.method_name = "tensorflow/serving/predict"
    inp = sig.inputs.add(key="pixels").value
    inp.name, inp.dtype = "serving_default_pixels:0", 1
    inp.tensor_shape.dim.add(size=-1)
    inp.tensor_shape.dim.add(size=28)
    out = sig.outputs.add(key="logits").value
    out.name, out.dtype = "StatefulPartitionedCall:0", 1
    out.tensor_shape.dim.add(size=-1)
    out.tensor_shape.dim.add(size=10)
    return sm.SerializeToString()


def _saved_model_dir(root: Path) -> Path:
    root.mkdir()
    (root / "saved_model.pb").write_bytes(_saved_model_bytes())
    (root / "variables").mkdir()
    (root / "variables" / "variables.index").write_bytes(b"\0" * 16)
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(b"\0" * 64)
    return root


def test_savedmodel_directory(tmp_path: Path) -> None:
    root = _saved_model_dir(tmp_path / "export")
    assert detect(root) == "tf-savedmodel"
    assert detect(root / "saved_model.pb") == "tf-savedmodel"
    desc = describe(root)
    assert desc.format == "tf-savedmodel" and desc.framework == "tensorflow"
    assert desc.metadata["meta_graphs"] == [{"tags": ["serve"], "tensorflow_version": "2.16.1"}]
    sig = desc.metadata["signatures"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert [(t.name, t.dtype, t.shape) for t in desc.inputs] == [("pixels", "float32", (None, 28))]
    assert [(t.name, t.shape) for t in desc.outputs] == [("logits", (None, 10))]
    assert desc.external_data == [
        "variables/variables.data-00000-of-00001",
        "variables/variables.index",
    ]
    assert desc.parameters is None


def test_savedmodel_graph_is_skipped_not_read(tmp_path: Path) -> None:
    path = tmp_path / "saved_model.pb"
    path.write_bytes(_saved_model_bytes(blob=b"\x01" * (8 << 20)))
    f = CountingFile(path)
    with f:
        desc = savedmodel.describe(f, Source(str(path)))
    assert desc.inputs[0].name == "pixels"
    assert f.bytes_read < 1 << 20


def test_savedmodel_pb_under_another_name_is_still_recognised(tmp_path: Path) -> None:
    path = tmp_path / "graph.bin"
    path.write_bytes(_saved_model_bytes())
    assert detect(path) == "tf-savedmodel"


def test_truncated_saved_model_pb_is_rejected(tmp_path: Path) -> None:
    root = _saved_model_dir(tmp_path / "export")
    data = (root / "saved_model.pb").read_bytes()
    (root / "saved_model.pb").write_bytes(data[:-7])
    with pytest.raises(ModelFormatError, match="truncated"):
        describe(root)


def test_folder_of_files_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert detect(tmp_path) is None
    with pytest.raises(ModelFormatError, match="describe_folder"):
        describe(tmp_path)


ML = build_messages(
    "coremltest",
    {
        "Empty": [],
        "ArrayFeatureType": [("shape", 1, "int64", True), ("dataType", 2, "enum_as_int", False)],
        "ImageFeatureType": [("width", 1, "int64", False), ("height", 2, "int64", False)],
        "FeatureType": [
            ("int64Type", 1, "Empty", False),
            ("doubleType", 2, "Empty", False),
            ("imageType", 4, "ImageFeatureType", False),
            ("multiArrayType", 5, "ArrayFeatureType", False),
        ],
        "FeatureDescription": [
            ("name", 1, "string", False),
            ("shortDescription", 2, "string", False),
            ("type", 3, "FeatureType", False),
        ],
        "UserEntry": [("key", 1, "string", False), ("value", 2, "string", False)],
        "Metadata": [
            ("shortDescription", 1, "string", False),
            ("versionString", 2, "string", False),
            ("author", 3, "string", False),
            ("license", 4, "string", False),
            ("userDefined", 100, "UserEntry", True),
        ],
        "ModelDescription": [
            ("input", 1, "FeatureDescription", True),
            ("output", 10, "FeatureDescription", True),
            ("predictedFeatureName", 11, "string", False),
            ("metadata", 100, "Metadata", False),
        ],
        "Layer": [("name", 1, "string", False)],
        "NeuralNetwork": [("layers", 1, "Layer", True)],
        "Model": [
            ("specificationVersion", 1, "int32", False),
            ("description", 2, "ModelDescription", False),
            ("isUpdatable", 10, "bool", False),
            ("neuralNetwork", 500, "NeuralNetwork", False),
            ("mlProgram", 502, "Empty", False),
        ],
    },
)


def _mlmodel_bytes(program: bool = False) -> bytes:
    model = ML["Model"](specificationVersion=7)
    d = model.description
    image = d.input.add(name="image")
    image.type.imageType.width, image.type.imageType.height = 224, 160
    arr = d.input.add(name="mask").type.multiArrayType
    arr.shape.extend([1, 3, 8])
    arr.dataType = 65552  # FLOAT16
    d.output.add(name="score").type.doubleType.SetInParent()
    d.metadata.author = "tests"
    d.metadata.license = "MIT"
    d.metadata.userDefined.add(key="com.github.apple.coremltools.version", value="8.0")
    if program:
        model.mlProgram.SetInParent()
    else:
        model.neuralNetwork.layers.add(name="conv")
    return model.SerializeToString()


def test_mlmodel_file(tmp_path: Path) -> None:
    path = tmp_path / "classifier.bin"
    path.write_bytes(_mlmodel_bytes())
    assert detect(path) == "coreml"
    desc = describe(path)
    assert desc.format == "coreml"
    assert desc.metadata["specification_version"] == 7
    assert desc.metadata["model_type"] == "neuralNetwork"
    assert desc.metadata["author"] == "tests"
    assert desc.metadata["user_defined"] == {"com.github.apple.coremltools.version": "8.0"}
    assert [(t.name, t.dtype, t.shape) for t in desc.inputs] == [
        ("image", "image", (160, 224)),
        ("mask", "float16", (1, 3, 8)),
    ]
    assert [(t.name, t.dtype) for t in desc.outputs] == [("score", "double")]


def test_mlpackage_directory(tmp_path: Path) -> None:
    pkg = tmp_path / "Detector.mlpackage"
    data = pkg / "Data" / "com.apple.CoreML"
    (data / "weights").mkdir(parents=True)
    (data / "model.mlmodel").write_bytes(_mlmodel_bytes(program=True))
    (data / "weights" / "weight.bin").write_bytes(b"\0" * 32)
    manifest = {
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            "AAA": {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Specification",
                "name": "model.mlmodel",
                "path": "com.apple.CoreML/model.mlmodel",
            },
            "BBB": {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Weights",
                "name": "weights",
                "path": "com.apple.CoreML/weights",
            },
        },
        "rootModelIdentifier": "AAA",
    }
    (pkg / "Manifest.json").write_text(json.dumps(manifest))
    assert detect(pkg) == "coreml"
    desc = describe(pkg)
    assert desc.metadata["model_type"] == "mlProgram"
    assert desc.metadata["package_version"] == "1.0.0"
    assert desc.external_data == ["Data/com.apple.CoreML/weights"]
    found = describe_folder(tmp_path)
    assert list(found) == ["Detector.mlpackage"]


def test_truncated_mlmodel_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.mlmodel"
    path.write_bytes(_mlmodel_bytes()[:-3])
    with pytest.raises(ModelFormatError, match="truncated"):
        describe(path)
