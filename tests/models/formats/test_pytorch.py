"""PyTorch checkpoints and TorchScript archives.

torch is not a dependency, so most tests build archives with the layout ``torch.save`` and
``torch.jit.save`` write (``torch/serialization.py``): a stored zip whose records sit under one
directory, with ``data.pkl`` pickled at protocol 2 and tensors as ``_rebuild_tensor_v2`` calls
on persistent ``("storage", <torch.FloatStorage>, key, "cpu", numel)`` ids. The pickles are
written opcode by opcode, so no torch import is needed. Tests against real torch files run
when torch is installed.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect
from cvmfs_ml.models.formats.pytorch import LEGACY_MAGIC


# --- a tiny pickle writer (protocol 2 opcodes, see pickletools) ---------------------------
def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _ordered_dict(pairs: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(k + v for k, v in pairs)
    return _global("collections", "OrderedDict") + b")R" + (b"(" + body + b"u" if pairs else b"")


def _tensor(key: str, storage: str, shape: tuple[int, ...], numel: int | None = None) -> bytes:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.insert(0, acc)
        acc *= d
    pid = _tuple(
        _str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel or acc)
    )
    return (
        _global("torch._utils", "_rebuild_tensor_v2")
        + _tuple(
            pid + b"Q",
            _int(0),
            _tuple(*map(_int, shape)),
            _tuple(*map(_int, stride)),
            b"\x89",
            _ordered_dict([]),
        )
        + b"R"
    )


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _archive(path: Path, records: dict[str, bytes], prefix: str = "archive") -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(f"{prefix}/{name}", data)


def _state_dict() -> bytes:
    return _pickle(
        _ordered_dict(
            [
                (_str("fc.weight"), _tensor("0", "FloatStorage", (3, 4))),
                (_str("fc.bias"), _tensor("1", "FloatStorage", (3,))),
                (_str("emb.weight"), _tensor("2", "HalfStorage", (10, 2))),
                (_str("steps"), _tensor("3", "LongStorage", ())),
            ]
        )
    )


def _checkpoint(path: Path) -> None:
    _archive(
        path,
        {
            "data.pkl": _state_dict(),
            "byteorder": b"little",
            "data/0": b"\0" * 48,
            "data/1": b"\0" * 12,
            "data/2": b"\0" * 40,
            "data/3": b"\0" * 8,
            "version": b"3\n",
            ".data/serialization_id": b"1234",
        },
        prefix="model",
    )


def test_checkpoint_layout_is_detected_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _checkpoint(path)
    assert detect(path) == "pytorch"
    desc = describe(path)
    assert desc.format == "pytorch" and desc.framework == "pytorch"
    assert desc.unsafe is True
    assert any("pickle" in w for w in desc.warnings)
    assert desc.tensors == 4
    assert desc.parameters == 12 + 3 + 20 + 1
    assert desc.dtypes == {"float32": 15, "float16": 20, "int64": 1}
    assert {w.name: w.shape for w in desc.weights}["fc.weight"] == (3, 4)
    assert desc.metadata["version"] == "3"
    assert desc.metadata["byteorder"] == "little"
    assert desc.metadata["state_dict"] is True
    assert desc.metadata["archive_name"] == "model"


def test_detection_does_not_need_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    _checkpoint(path)
    assert detect(path) == "pytorch"
    plain = tmp_path / "other.pt"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    assert detect(plain) is None


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _pickle(_global("os", "system") + _tuple(_str(f"touch {marker}")) + b"R")
    path = tmp_path / "evil.pt"
    _archive(path, {"data.pkl": evil, "version": b"3\n"})
    desc = describe(path)
    assert not marker.exists()
    assert desc.metadata["root_class"] == "os.system"
    assert desc.parameters == 0 and desc.unsafe


def test_shared_storage_views_are_counted_once(tmp_path: Path) -> None:
    tied = _pickle(
        _ordered_dict(
            [
                (_str("embed.weight"), _tensor("0", "FloatStorage", (5, 2))),
                (_str("lm_head.weight"), _tensor("0", "FloatStorage", (5, 2))),
            ]
        )
    )
    path = tmp_path / "tied.pt"
    _archive(path, {"data.pkl": tied, "data/0": b"\0" * 40})
    desc = describe(path)
    assert desc.parameters == 10
    assert desc.tensors == 1


def test_missing_storage_record_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    _archive(path, {"data.pkl": _state_dict(), "data/0": b"\0" * 48})
    desc = describe(path)
    assert any("storage records missing" in w for w in desc.warnings)


def test_corrupt_data_pkl_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    _archive(path, {"data.pkl": b"\x80\x02}q\x00(X\x05\x00\x00\x00abc", "version": b"3\n"})
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert "data.pkl is not a valid pickle" in str(info.value)
    assert str(path) in str(info.value)


def test_truncated_zip_named_pt_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    _checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert detect(path) is None
    with pytest.raises(ModelFormatError, match="bad zip archive"):
        describe(path)


def test_legacy_format_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    path.write_bytes(LEGACY_MAGIC + b"\x80\x02M\xe9\x03.")
    assert detect(path) == "pytorch"
    desc = describe(path)
    assert desc.unsafe and desc.metadata["legacy_format"] is True


_SCRIPT_CODE = """\
class Net(Module):
  __parameters__ = []
  __buffers__ = []
  training : bool
  fc : __torch__.torch.nn.modules.linear.Linear
  def forward(self: __torch__.Net,
    x: Tensor,
    lengths: Optional[Tensor]=None) -> Tuple[Tensor, Tensor]:
    fc = self.fc
    return ((fc).forward(x, ), x)
"""


def _script(path: Path) -> None:
    linear = (
        _global("__torch__.torch.nn.modules.linear", "Linear")
        + b")\x81}("
        + _str("training")
        + b"\x89"
        + _str("weight")
        + _tensor("0", "FloatStorage", (2, 3))
        + _str("bias")
        + _tensor("1", "FloatStorage", (2,))
        + b"ub"
    )
    root = (
        _global("__torch__", "Net")
        + b")\x81}("
        + _str("training")
        + b"\x89"
        + _str("fc")
        + linear
        + b"ub"
    )
    _archive(
        path,
        {
            "data.pkl": _pickle(root),
            "constants.pkl": _pickle(b")"),
            "code/__torch__.py": _SCRIPT_CODE.encode(),
            "code/__torch__/torch/nn/modules/linear.py": b"class Linear(Module):\n  pass\n",
            "data/0": b"\0" * 24,
            "data/1": b"\0" * 8,
            "version": b"2\n",
            "extra/producer.txt": b"tests",
        },
        prefix="net",
    )


def test_torchscript_layout_is_detected_and_described(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    _script(path)
    assert detect(path) == "torchscript"
    desc = describe(path)
    assert desc.format == "torchscript" and desc.unsafe
    assert desc.metadata["root_class"] == "__torch__.Net"
    assert desc.metadata["code_files"] == 2
    assert desc.metadata["extra_files"] == ["producer.txt"]
    assert desc.parameters == 8
    assert {w.name for w in desc.weights} == {"fc.weight", "fc.bias"}
    assert [(t.name, t.dtype) for t in desc.inputs] == [
        ("x", "Tensor"),
        ("lengths", "Optional[Tensor]"),
    ]
    assert desc.outputs[0].dtype == "Tuple[Tensor, Tensor]"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated upstream
def test_real_torch_files(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    n_params = sum(p.numel() for p in model.parameters())
    ckpt = tmp_path / "state.pt"
    torch.save(model.state_dict(), ckpt)
    assert detect(ckpt) == "pytorch"
    desc = describe(ckpt)
    assert desc.parameters == n_params
    assert desc.dtypes == {"float32": n_params}
    assert desc.metadata["state_dict"] is True
    # A training checkpoint: elements are attributed to their top-level key.
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    train = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, train)
    desc = describe(train)
    assert desc.metadata["parameters_by_key"]["model"] == n_params
    assert desc.metadata["top_level_keys"] == ["model", "optimizer", "epoch"]
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), scripted)
    assert detect(scripted) == "torchscript"
    desc = describe(scripted)
    assert desc.format == "torchscript"
    assert desc.parameters == sum(p.numel() for p in model.parameters())
    assert desc.inputs and desc.inputs[0].dtype == "Tensor"
