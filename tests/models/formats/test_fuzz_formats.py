"""Hostile model files: detection and description give only our errors, and nothing hangs.

Uploads to the registry and synced artifacts are described (``model.json``) from bytes a
stranger wrote, so ``detect`` must answer a format or None and ``describe`` a description or a
:class:`ModelFormatError`, whatever the bytes. The parsers sit on libraries that raise their
own types on damage (zipfile: ``NotImplementedError`` for an unsupported version,
``RuntimeError`` for an encrypted member, ``zlib.error`` for a corrupt deflate stream; h5py:
``OSError``, ``KeyError``, ``RuntimeError``, ``OverflowError``...), all of which a random
mutation fuzzer found getting through before. Genuine files of each format are made here
(onnx's helper API, safetensors, pickle, torch.save and TorchScript where torch is installed,
GGUF and HDF5 where their packages are), then damaged: the named cases first, then a
deterministic Hypothesis fuzz.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_ml.models.formats import ModelFormatError, describe, detect

FUZZ = settings(
    derandomize=True,  # the same examples on every run: CI cannot flake on a lucky draw
    max_examples=120,
    deadline=dt.timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.arange(128, dtype=np.float32).reshape(16, 8), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _safetensors() -> bytes:
    from safetensors.numpy import save

    return save({"a": np.zeros((4, 4), np.float32), "b": np.ones(3, np.int64)}, {"k": "v"})


def _torch_zip() -> dict[str, bytes]:
    torch = pytest.importorskip("torch")
    plain, script = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.zeros(3, 3), "n": 3}, plain)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    return {"model.pt": plain.getvalue(), "script.pt": script.getvalue()}


def _gguf(tmp: Path) -> bytes:
    gguf = pytest.importorskip("gguf")
    path = tmp / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("x", 3)
    writer.add_tensor("t", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _hdf5(tmp: Path) -> bytes:
    h5py = pytest.importorskip("h5py")
    path = tmp / "m.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("dense/kernel", data=np.zeros((4, 4)))
        h5.attrs["keras_version"] = "2.0"
        h5.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {}})
    return path.read_bytes()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("formats")
    files = {
        "model.onnx": _onnx(),
        "model.safetensors": _safetensors(),
        "model.pkl": pickle.dumps({"w": np.zeros(4), "cfg": [1, 2, "x"]}, protocol=4),
    }
    for name, make in (("model.gguf", _gguf), ("model.h5", _hdf5)):
        try:
            files[name] = make(tmp)
        except pytest.skip.Exception:
            pass
    try:
        files.update(_torch_zip())
    except pytest.skip.Exception:
        pass
    for name, data in files.items():  # each is what its name says, before any damage
        assert detect(io.BytesIO(data), name=name) is not None, name
        describe(io.BytesIO(data), name=name)
    return files


def _outcome(data: bytes, name: str) -> str:
    """Detect and describe ``data``; only None, a format or ModelFormatError may come out."""
    found = detect(io.BytesIO(data), name=name)
    assert found is None or isinstance(found, str)
    try:
        describe(io.BytesIO(data), name=name)
    except ModelFormatError as exc:
        assert name in str(exc) or "<file>" in str(exc)
        return "refused"
    return "described"


def _zip_with(member: bytes, *, compress: int = zipfile.ZIP_DEFLATED) -> bytearray:
    """A PyTorch-style zip (``archive/data.pkl`` and ``archive/version``)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", member)
        z.writestr("archive/version", b"3\n")
    return bytearray(out.getvalue())


def _central_entries(data: bytearray) -> list[int]:
    """Offsets of the central directory's file headers."""
    offsets, at = [], data.find(b"PK\x01\x02")
    while at != -1:
        offsets.append(at)
        at = data.find(b"PK\x01\x02", at + 4)
    return offsets


def test_zip_with_an_unsupported_version_is_refused() -> None:
    data = _zip_with(pickle.dumps({"w": 1}))
    for at in _central_entries(data):
        data[at + 6 : at + 8] = struct.pack("<H", 255)  # "version needed to extract": 25.5
    assert _outcome(bytes(data), "model.pt") in ("refused", "described")
    with pytest.raises(ModelFormatError):
        describe(io.BytesIO(bytes(data)), name="model.pt")


def test_zip_with_an_encrypted_member_is_refused() -> None:
    data = _zip_with(pickle.dumps({"w": 1}))
    for at in _central_entries(data):
        flags = struct.unpack_from("<H", data, at + 8)[0]
        struct.pack_into("<H", data, at + 8, flags | 1)  # bit 0: encrypted
    with pytest.raises(ModelFormatError, match=r"model\.pt"):
        describe(io.BytesIO(bytes(data)), name="model.pt")


def test_zip_with_a_corrupt_deflate_stream_is_refused() -> None:
    member = pickle.dumps({"w": list(range(2000))}, protocol=4)
    data = _zip_with(member)
    start = data.find(b"archive/data.pkl") + len("archive/data.pkl")  # the local header's name
    for i in range(start + 8, start + 40):
        data[i] ^= 0x5A
    with pytest.raises(ModelFormatError, match=r"model\.pt"):
        describe(io.BytesIO(bytes(data)), name="model.pt")


def test_damaged_hdf5_is_refused(genuine: dict[str, bytes]) -> None:
    if "model.h5" not in genuine:
        pytest.skip("h5py not installed")
    data = genuine["model.h5"]
    outcomes = set()
    # Overwrite each 8-byte word after the superblock with all ones in turn: addresses past the
    # end, sizes that overflow, broken object headers.
    for at in range(96, min(len(data), 4096), 64):
        damaged = bytearray(data)
        damaged[at : at + 8] = b"\xff" * 8
        outcomes.add(_outcome(bytes(damaged), "model.h5"))
    assert "refused" in outcomes


@FUZZ
@given(data=st.data())
def test_mutated_model_files_give_only_format_errors(
    genuine: dict[str, bytes], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(genuine)))
    original = bytearray(genuine[name])
    edits = data.draw(st.lists(st.tuples(
        st.integers(0, len(original)),
        st.sampled_from(["byte", "cut", "u32", "u64", "insert"]),
        st.integers(0, 2**64 - 1),
    ), min_size=1, max_size=6))  # fmt: skip
    for at, kind, value in edits:
        at = min(at, len(original))
        if kind == "byte" and at < len(original):
            original[at] = value & 0xFF
        elif kind == "cut":
            del original[at:]
        elif kind == "u32":
            original[at : at + 4] = struct.pack("<I", value & 0xFFFFFFFF)
        elif kind == "u64":
            original[at : at + 8] = struct.pack("<Q", value)
        else:
            original[at:at] = value.to_bytes(8, "little")
    _outcome(bytes(original), name)


@FUZZ
@given(blob=st.binary(max_size=4096), name=st.sampled_from(
    ["model.onnx", "model.safetensors", "model.pt", "model.pkl", "model.gguf", "model.h5",
     "model.tflite", "model.json", "model.pmml", "model.bin"]))  # fmt: skip
def test_random_bytes_under_model_names(blob: bytes, name: str) -> None:
    _outcome(blob, name)


def test_the_named_cases_reach_the_publish_as_warnings(tmp_path: Path) -> None:
    """A damaged model file still publishes: its description is a warning, not a failure."""
    from cvmfs_ml.models.prepare import describe_models, prepare_source

    data = _zip_with(pickle.dumps({"w": 1}))
    for at in _central_entries(data):
        flags = struct.unpack_from("<H", data, at + 8)[0]
        struct.pack_into("<H", data, at + 8, flags | 1)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.pt").write_bytes(bytes(data))
    (folder / "weights.safetensors").write_bytes(_safetensors())
    models, warnings = describe_models(prepare_source(folder)[0])
    # The damaged file is named with what is wrong with it, and the folder's other model is
    # still described: before, zipfile's RuntimeError threw the whole description away
    # ("could not describe the model files: RuntimeError: ...").
    assert models["model.pt"]["format"] == "pytorch"
    assert models["weights.safetensors"]["tensors"] == 2
    assert any("model.pt" in w and "encrypted" in w for w in warnings), warnings
    assert not any("could not describe" in w for w in warnings), warnings


def _keras_h5(path: Path) -> bytes:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as h5:
        h5.create_dataset("dense/kernel", data=np.zeros((4, 4)))
        h5.attrs["keras_version"] = "2.0"
    return path.read_bytes()


def test_hdf5_asking_for_gigabytes_is_described_in_a_capped_child(tmp_path: Path) -> None:
    """A Keras HDF5 file whose one variable-length attribute claims 4 GB (its length field
    patched): in this process h5py allocated ~4 GiB and took ~5 s before raising. Described in
    the memory-capped child, it is a quick ModelFormatError and this process does not grow."""
    import resource
    import time

    from cvmfs_ml.models.formats.base import Source
    from cvmfs_ml.models.formats.hdf5 import describe_here
    from cvmfs_ml.models.formats.isolated import describe_in_child

    genuine = tmp_path / "ok.h5"
    data = bytearray(_keras_h5(genuine))
    # The same description from the child as from this process (the JSON round trip).
    here = describe_here(io.BytesIO(bytes(data)), Source(str(genuine)))
    assert describe_in_child(str(genuine), "hdf5").to_json() == here.to_json()
    assert describe(genuine).metadata["keras_version"] == "2.0"

    heap = data.find(b"GCOL")
    ref = data.find(struct.pack("<I", 3) + struct.pack("<Q", heap))  # "2.0": length, heap
    assert heap > 0 and ref > 0
    data[ref : ref + 4] = struct.pack("<I", 0xF0000000)
    bomb = tmp_path / "bomb.h5"
    bomb.write_bytes(bytes(data))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ModelFormatError, match=r"bomb\.h5"):
        describe(bomb)
    assert time.monotonic() - start < 60
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, grown_mib
