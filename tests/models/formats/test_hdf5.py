"""Keras (v3 ``.keras`` zip and legacy HDF5) and plain HDF5, written with h5py.

Keras itself is not a dependency: the files follow the layouts Keras writes
(``keras/src/saving/saving_lib.py``: ``config.json``, ``metadata.json``, ``model.weights.h5``
with ``layers/<name>/vars/<i>`` datasets; legacy ``save_model``: root attributes
``keras_version``/``backend``/``model_config`` and weights under ``model_weights``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect

h5py = pytest.importorskip("h5py")

_CONFIG = {
    "module": "keras",
    "class_name": "Sequential",
    "config": {
        "name": "sequential",
        "layers": [
            {
                "module": "keras.layers",
                "class_name": "InputLayer",
                "config": {"batch_shape": [None, 4], "dtype": "float32", "name": "features"},
            },
            {
                "module": "keras.layers",
                "class_name": "Dense",
                "config": {"name": "dense", "units": 3},
            },
        ],
    },
}


def _weights_h5(path: Path) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("layers/dense/vars/0", data=np.zeros((4, 3), np.float32))
        h5.create_dataset("layers/dense/vars/1", data=np.zeros(3, np.float32))
        h5.create_dataset("optimizer/vars/0", data=np.zeros(1, np.int64))
        h5.create_dataset("optimizer/vars/1", data=np.zeros((4, 3), np.float32))


def _keras_zip(path: Path, tmp: Path, compression: int = zipfile.ZIP_STORED) -> None:
    weights = tmp / "model.weights.h5"
    _weights_h5(weights)
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.5.0", "date_saved": "x"}))
        z.writestr("config.json", json.dumps(_CONFIG))
        z.write(weights, "model.weights.h5")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_keras_v3_zip(tmp_path: Path, compression: int) -> None:
    path = tmp_path / "model.keras"
    _keras_zip(path, tmp_path, compression)
    assert detect(path) == "keras"
    desc = describe(path)
    assert desc.format == "keras" and desc.framework == "keras"
    assert desc.metadata["keras_version"] == "3.5.0"
    assert desc.metadata["class_name"] == "Sequential"
    assert desc.metadata["layers"] == 2
    assert [(t.name, t.dtype, t.shape) for t in desc.inputs] == [("features", "float32", (None, 4))]
    assert desc.parameters == 15  # optimizer state is not counted
    assert desc.tensors == 2
    assert desc.dtypes == {"float32": 15}
    assert not desc.unsafe


def test_keras_zip_without_config_is_not_keras(tmp_path: Path) -> None:
    path = tmp_path / "archive.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("something.txt", "hi")
    assert detect(path) is None


def test_legacy_keras_h5(tmp_path: Path) -> None:
    path = tmp_path / "legacy.h5"
    legacy_config = {
        "class_name": "Sequential",
        "config": {
            "name": "seq",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 8], "dtype": "float32", "name": "in"},
                }
            ],
        },
    }
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.attrs["model_config"] = json.dumps(legacy_config)
        h5.create_dataset("model_weights/dense/dense/kernel:0", data=np.zeros((8, 2), np.float32))
        h5.create_dataset("model_weights/dense/dense/bias:0", data=np.zeros(2, np.float32))
        h5.create_dataset("optimizer_weights/iter:0", data=np.zeros((), np.int64))
    assert detect(path) == "keras"
    desc = describe(path)
    assert desc.metadata["keras_version"] == "2.15.0"
    assert desc.metadata["backend"] == "tensorflow"
    assert desc.metadata["legacy_h5"] is True
    assert desc.parameters == 18
    assert desc.inputs[0].shape == (None, 8)


def test_plain_hdf5_with_user_block(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    with h5py.File(path, "w", userblock_size=1024) as h5:
        h5.create_dataset("x", data=np.zeros((10, 10), np.float64))
        h5.create_dataset("g/y", data=np.zeros(5, np.int32))
    assert path.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n"
    assert detect(path) == "hdf5"
    desc = describe(path)
    assert desc.format == "hdf5"
    assert desc.parameters is None  # an HDF5 file may hold data, not weights
    assert desc.metadata["elements"] == 105
    assert desc.tensors == 2
    assert desc.dtypes == {"float64": 100, "int32": 5}


def test_broken_hdf5_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    assert detect(path) is None
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert "bad HDF5 file" in str(info.value) and str(path) in str(info.value)


def test_keras_zip_with_bad_config_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{not json")
    assert detect(path) == "keras"
    with pytest.raises(ModelFormatError, match=r"config\.json is not valid JSON"):
        describe(path)
