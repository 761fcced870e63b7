"""Model files and folders whose *metadata* is hostile: bounded, described or refused, never a
crash, a hang or gigabytes of memory.

Each case was found by trying it on ``cvmfs-ml model publish`` (stop 26's sweep):

* a 4.7 kB PyTorch archive whose ``data.pkl`` nests a tuple 5 million deep as a dict key
  crashed the publishing process (segfault, nothing on stderr); 58 kB of pickle making 60
  million dicts took 7 GB. Such files are now unpickled in a memory-capped child process;
* a safetensors, ONNX or PyTorch header with 200,000 dimensions of ``2**62`` (or dimensions of
  4000 digits) hung publishing in big-integer products;
* an ONNX file with 200,000 external data locations took time quadratic in their number;
* a 300 MB README took 5 GB to read for its front matter, and a 50 MB licence string went into
  ``model.json`` and the index;
* an MLflow ``MLmodel`` with a 5000-digit number answered with Python's advice to raise an
  interpreter limit.

The previous revision stays intact in every case: describing happens before the transaction.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

from cvmfs_ml.errors import FormatError
from cvmfs_ml.models.formats import describe, onnx_format
from cvmfs_ml.models.formats.base import ModelFormatError
from cvmfs_ml.models.sources import local
from cvmfs_ml.models.sources.local import detect_license, read_model_card
from cvmfs_ml.models.sources.mlflow import read_mlmodel
from models.cli_repo import cli, repo_with_good_model


def _torch_archive(folder: Path, pickle_bytes: bytes) -> Path:
    folder.mkdir(parents=True)
    path = folder / "model.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return repo_with_good_model(tmp_path, "meta.test")


def _warnings(repo: Path, ref: str) -> list[str]:
    shown = cli("model", "info", repo, ref, "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["warnings"]


# Built in the test, not in the parameters: a parameter is part of the test's id, which pytest
# puts in the environment (PYTEST_CURRENT_TEST), and 5 MB there fails every subprocess.
PICKLES = {
    # a tuple nested 5 million deep as a dict key: hashing it recursed in C until the stack
    # ran out
    "deep": (lambda: b"\x80\x02})" + b"\x85" * 5_000_000 + b"K\x01s.", "crashed on it"),
    # 60 million empty dicts from 60 MB of pickle (58 kB zipped)
    "dicts": (lambda: b"\x80\x02(" + b"}" * 60_000_000 + b"l.", "MiB of memory"),
}


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_a_pickle_that_crashes_or_floods_the_unpickler_is_only_a_warning(
    repo: Path, tmp_path: Path, case: str
) -> None:
    make, said = PICKLES[case]
    folder = tmp_path / case
    _torch_archive(folder, make())
    done = cli("model", "publish", folder, "--repo", repo, "--as", f"t/{case}:1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    warnings = _warnings(repo, f"t/{case}:1")
    assert any(said in w for w in warnings), warnings
    checked = cli("repo", "check", repo)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "t/good" in cli("model", "ls", repo).stdout  # the earlier version is still there


def test_a_genuine_checkpoint_is_still_described_through_the_child(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, path)
    desc = describe(path)
    assert desc.format == "pytorch" and desc.parameters == 16 and desc.tensors == 2
    assert sorted(w.name for w in desc.weights) == ["b", "w"]


def _safetensors(path: Path, shape: list[int]) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    return path


@pytest.mark.parametrize(
    ("shape", "said"),
    [
        ([2**62] * 20_000, "over 2**64 elements"),
        ([10**4000], "a dimension of 13288 bits"),
        ([1] * 100, "over 64 dimensions"),
    ],
)
def test_tensor_shapes_no_real_tensor_has_are_format_errors(
    tmp_path: Path, shape: list[int], said: str
) -> None:
    with pytest.raises(ModelFormatError, match=re.escape(said)):
        describe(_safetensors(tmp_path / "m.safetensors", shape))


def test_an_onnx_initializer_of_absurd_shape_is_a_format_error(tmp_path: Path) -> None:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**40] * 3)
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", 1, [1])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ModelFormatError, match="over 2\\*\\*64 elements"):
        describe(path)


def test_onnx_external_data_files_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = []
    for i in range(5):
        t = helper.make_tensor(f"w{i}", TensorProto.FLOAT, [1], b"\0" * 4, raw=True)
        set_external_data(t, location=f"w{i % 4}.bin")  # one location used twice
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        tensors.append(t)
    out = helper.make_tensor_value_info("w0", 1, [1])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [out], tensors)), path)
    desc = describe(path)
    assert desc.external_data == [f"w{i}.bin" for i in range(4)]  # once each, in order
    monkeypatch.setattr(onnx_format, "MAX_EXTERNAL_FILES", 3)
    with pytest.raises(ModelFormatError, match="over 3 external data files"):
        describe(path)


def test_model_card_and_licence_are_read_within_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "card"
    folder.mkdir()
    tags = "".join(f"  - tag{i}\n" for i in range(1000))
    (folder / "README.md").write_text(f"---\nlicense: {'x' * 10_000}\ntags:\n{tags}---\n# Model\n")
    card = read_model_card(folder)
    assert len(card["license"]) == local.MAX_VALUE_CHARS and card["license"].endswith("…")
    assert card["tags"] == [f"tag{i}" for i in range(local.MAX_LIST_ITEMS)]
    # Front matter that does not close within the bytes read is not front matter.
    (folder / "README.md").write_text("---\nlicense: mit\n" + "a: b\n" * 100_000 + "---\n")
    monkeypatch.setattr(local, "MAX_CARD_BYTES", 4096)
    assert read_model_card(folder) == {}
    # A config.json over the bound is not read for a licence; one within it is, cut.
    (folder / "README.md").unlink()
    (folder / "config.json").write_text(json.dumps({"license": "y" * 1000, "pad": "z" * 5000}))
    assert detect_license(folder) == "y" * (local.MAX_VALUE_CHARS - 1) + "…"
    monkeypatch.setattr(local, "MAX_CONFIG_BYTES", 1000)
    assert detect_license(folder) is None


@pytest.mark.parametrize(
    ("value", "said"),
    [("9" * 5000, "a number of over 4300 digits"), ("2024-13-45", "month must be in 1..12")],
)
def test_mlmodel_values_yaml_cannot_build_name_the_file(
    tmp_path: Path, value: str, said: str
) -> None:
    (tmp_path / "MLmodel").write_text(f"flavors: {{}}\nsize: {value}\n")
    with pytest.raises(FormatError, match=re.escape(said)) as caught:
        read_mlmodel(tmp_path)
    assert str(tmp_path / "MLmodel") in str(caught.value)
    assert "set_int_max_str_digits" not in str(caught.value)
