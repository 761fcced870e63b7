"""Model layout: references, model.json and the index, and that publish, alias moves and
removals keep the index and the tree consistent, also under concurrent publishers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import FormatError, NotFoundError, PublishError
from cvmfs_ml.models.layout import INDEX_PATH, Index, ModelFile, ModelRecord, ModelRef
from cvmfs_ml.models.publish import (
    list_models,
    model_info,
    publish_model,
    reindex,
    remove_alias,
    remove_model,
    set_alias,
)
from cvmfs_ml.models.tree import check_layout, read_index, scan_models
from cvmfs_ml.publish.repository import Publisher, create_repository
from repos import SMALL_CHUNKS

SETTINGS = SMALL_CHUNKS


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return create_repository(tmp_path / "srv", "models.test", settings=SETTINGS)


def reader(publisher: Publisher) -> Repository:
    """A fresh verified view of the current revision."""
    return Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public)


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """``make_model(name, files={rel: bytes})`` -> a source folder."""

    def make(name: str, files: dict[str, bytes] | None = None) -> Path:
        root = tmp_path / "src" / name
        root.mkdir(parents=True)
        for rel, data in ({"weights.bin": name.encode() * 100} if files is None else files).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    return make


def ref(text: str) -> ModelRef:
    return ModelRef.parse(text)


# -- references and documents ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hep/pt:1.0", ModelRef("hep", "pt", "1.0")),
        ("Org_1/my-model.v2:2024.05+cpu", ModelRef("Org_1", "my-model.v2", "2024.05+cpu")),
        ("hep/pt", ModelRef("hep", "pt", None)),
    ],
)
def test_ref_parse(text: str, expected: ModelRef) -> None:
    parsed = ModelRef.parse(text)
    assert parsed == expected
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "hep:1.0",
        "a/b/c:1.0",
        "../pt:1.0",
        "hep/..:1.0",
        ".cvmfs-ml/pt:1.0",
        "hep/pt:",
        "hep/pt:1/2",
        "-x/pt:1",
        "he p/pt:1",
        "hep/pt:.hidden",
        "hep/pt+x:1",
        "hep/pt:" + "1" * 129,
    ],
)
def test_ref_parse_refuses_unsafe_names(text: str) -> None:
    with pytest.raises(ValueError):
        ModelRef.parse(text)


def test_ref_paths_and_required_version() -> None:
    r = ModelRef.parse("hep/pt:1.0")
    assert (r.model_path, r.path, r.model_json_path) == (
        "/hep/pt",
        "/hep/pt/1.0",
        "/hep/pt/1.0/model.json",
    )
    assert r.alias_path("latest") == "/hep/pt/latest"
    with pytest.raises(ValueError, match="needs a version"):
        ModelRef.parse("hep/pt", require_version=True)
    with pytest.raises(ValueError):
        r.alias_path("../x")


def test_record_and_index_round_trip_keep_unknown_keys() -> None:
    record = ModelRecord(
        ref=ref("hep/pt:1.0"),
        format="onnx",
        files=[ModelFile("model.onnx", 3, "ab" * 32)],
        size=3,
        file_count=1,
        unknown={"future_field": [1, 2]},
    )
    again = ModelRecord.from_json(json.loads(record.to_bytes()))
    assert again.to_json() == record.to_json()
    assert again.unknown == {"future_field": [1, 2]}
    index = Index()
    index.add(record, ["latest"])
    index.unknown["mirror"] = "x"
    raw = json.loads(index.to_bytes())
    raw["models"]["hep/pt"]["owner"] = "alice"
    back = Index.from_bytes(json.dumps(raw).encode())
    assert json.loads(back.to_bytes()) == raw | {"updated": ""}
    assert [str(r.ref) for r in back.records()] == ["hep/pt:1.0"]
    assert back.records()[0].aliases == ["latest"]


def test_documents_refuse_foreign_json() -> None:
    with pytest.raises(FormatError, match="not a cvmfs-ml index"):
        Index.from_bytes(b'{"models": {}}')
    with pytest.raises(FormatError, match="not JSON"):
        Index.from_bytes(b"{")
    with pytest.raises(FormatError, match=r"not a cvmfs-ml model\.json"):
        ModelRecord.from_json({"schema": "other/1"})


# -- publishing -------------------------------------------------------------------------------
def test_publish_writes_version_model_json_index_and_latest(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    files = {"weights.bin": os.urandom(300_000), "sub/config.txt": b"a=1\n"}
    src = make_model("pt", files)
    record = publish_model(
        publisher, src, ref("hep/pt:1.0"), description="test", publisher_name="tester"
    )
    assert record.aliases == ["latest"]
    assert publisher.manifest().revision == 1  # one transaction for everything
    with reader(publisher) as repo:
        version = repo.stat("/hep/pt/1.0")
        assert version.is_nested_mountpoint  # one nested catalog per version
        for rel, data in files.items():
            assert repo.read_bytes(f"/hep/pt/1.0/{rel}") == data
        stored = json.loads(repo.read_bytes("/hep/pt/1.0/model.json"))
        assert stored["schema"] == "cvmfs-ml.model/1"
        assert stored["published_by"] == "tester"
        assert stored["description"] == "test"
        assert stored["source"]["type"] == "local"
        assert {f["path"]: f["sha256"] for f in stored["files"]} == {
            rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
        }
        assert stored["size"] == sum(map(len, files.values()))
        assert repo.readlink("/hep/pt/latest") == "1.0"  # relative: works under any mount
        index = read_index(repo)
        assert index.models["hep/pt"].aliases == {"latest": "1.0"}
        assert index.models["hep/pt"].versions["1.0"]["size"] == stored["size"]
        assert check_layout(repo) == []
        info = model_info(repo, "hep/pt")
        assert info.version == "1.0"
        assert info.aliases == ["latest"]
        assert info.digests() == record.digests()


def test_publish_single_file(publisher: Publisher, tmp_path: Path) -> None:
    path = tmp_path / "net.onnx.bin"
    path.write_bytes(b"\x01" * 1000)
    record = publish_model(publisher, path, ref("hep/file:1"))
    assert [f.path for f in record.files] == ["net.onnx.bin"]
    assert record.source["kind"] == "file"
    with reader(publisher) as repo:
        assert repo.read_bytes("/hep/file/1/net.onnx.bin") == b"\x01" * 1000


def test_same_bytes_again_is_a_no_op(publisher: Publisher, make_model: Callable[..., Path]) -> None:
    src = make_model("pt")
    first = publish_model(publisher, src, ref("hep/pt:1.0"))
    copy = make_model("copy", {"weights.bin": b"pt" * 100})  # same bytes, another folder
    again = publish_model(publisher, copy, ref("hep/pt:1.0"), description="ignored")
    assert publisher.manifest().revision == 1
    assert again.created == first.created
    assert again.digests() == first.digests()


def test_different_bytes_under_a_published_version_are_refused(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    publish_model(publisher, make_model("a", {"w.bin": b"1", "keep.txt": b"k"}), ref("x/m:1"))
    changed = make_model("b", {"w.bin": b"2", "keep.txt": b"k", "new.txt": b"n"})
    with pytest.raises(PublishError, match=r"changed: w\.bin; added: new\.txt"):
        publish_model(publisher, changed, ref("x/m:1"))
    assert publisher.manifest().revision == 1


def test_names_that_would_break_the_layout_are_refused(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    src = make_model("m")
    with pytest.raises(PublishError, match="reserved"):
        publish_model(publisher, src, ref("x/m:latest"))
    with pytest.raises(PublishError, match="version name itself"):
        publish_model(publisher, src, ref("x/m:1"), aliases=["1"])
    with pytest.raises(ValueError, match="invalid alias"):
        publish_model(publisher, src, ref("x/m:1"), aliases=["a/b"])
    publish_model(publisher, src, ref("x/m:1"))
    with pytest.raises(PublishError, match="is a version, not an alias"):
        publish_model(publisher, make_model("n"), ref("x/m:2"), aliases=["1"])
    set_alias(publisher, "x/m", "stable", "1")
    with pytest.raises(PublishError, match="is an alias, not a version"):
        publish_model(publisher, src, ref("x/m:stable"))
    with pytest.raises(PublishError, match="version name itself"):
        set_alias(publisher, "x/m", "1", "1")
    reserved = make_model("r", {"model.json": b"{}"})
    with pytest.raises(PublishError, match="reserved for the metadata"):
        publish_model(publisher, reserved, ref("x/r:1"))
    empty = make_model("e", {})
    with pytest.raises(PublishError, match="no files"):
        publish_model(publisher, empty, ref("x/e:1"))


def test_alias_moves_and_removals_keep_index_and_tree_consistent(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    for version in ("1", "2", "3"):
        publish_model(publisher, make_model(f"v{version}"), ref(f"hep/pt:{version}"))
    set_alias(publisher, "hep/pt", "stable", "1")
    set_alias(publisher, "hep/pt", "stable", "2")  # move
    set_alias(publisher, ref("hep/pt"), "prod", "2")
    with reader(publisher) as repo:
        assert check_layout(repo) == []
        assert repo.readlink("/hep/pt/stable") == "2"
        assert read_index(repo).models["hep/pt"].aliases == {
            "latest": "3",
            "stable": "2",
            "prod": "2",
        }
        assert model_info(repo, "hep/pt:stable").version == "2"
        assert model_info(repo, "hep/pt:2").aliases == ["prod", "stable"]
    remove_alias(publisher, "hep/pt", "prod")
    with reader(publisher) as repo:
        assert check_layout(repo) == []
        assert not repo.exists("/hep/pt/prod")
        assert "prod" not in read_index(repo).models["hep/pt"].aliases
    with pytest.raises(NotFoundError):
        remove_alias(publisher, "hep/pt", "prod")
    with pytest.raises(NotFoundError):
        set_alias(publisher, "hep/pt", "beta", "9")


def test_remove_moves_latest_and_drops_other_aliases(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    publish_model(publisher, make_model("a"), ref("hep/pt:1"))
    publish_model(publisher, make_model("b"), ref("hep/pt:2"))
    publish_model(publisher, make_model("c"), ref("other/m:1"))
    set_alias(publisher, "hep/pt", "stable", "2")
    remove_model(publisher, ref("hep/pt:2"))
    with reader(publisher) as repo:
        assert check_layout(repo) == []
        assert repo.readlink("/hep/pt/latest") == "1"  # latest falls back to what is left
        assert not repo.exists("/hep/pt/stable")  # a user alias is not re-aimed
        assert not repo.exists("/hep/pt/2")
        assert [str(r.ref) for r in list_models(repo)] == ["hep/pt:1", "other/m:1"]
    with pytest.raises(PublishError, match="is an alias"):
        remove_model(publisher, ref("hep/pt:latest"))
    remove_model(publisher, ref("hep/pt:1"))  # last version: model and namespace go
    with reader(publisher) as repo:
        assert check_layout(repo) == []
        assert not repo.exists("/hep")
        assert list(read_index(repo).models) == ["other/m"]
    with pytest.raises(NotFoundError):
        remove_model(publisher, ref("hep/pt:1"))


def test_check_layout_reports_a_stale_index_and_reindex_repairs_it(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    publish_model(publisher, make_model("a"), ref("hep/pt:1"))
    publish_model(publisher, make_model("b"), ref("hep/qt:1"))
    with publisher.transaction() as txn:  # someone edits the tree by hand
        txn.remove("/hep/qt/1")
        txn.symlink("/hep/pt/broken", "9")
        txn.commit()
    with reader(publisher) as repo:
        problems = check_layout(repo)
    assert any("hep/qt" in p and "no version in the tree" in p for p in problems)
    assert any("broken -> 9 dangles" in p for p in problems)
    reindex(publisher)
    with reader(publisher) as repo:
        assert [p for p in check_layout(repo) if "dangles" not in p] == []
        assert list(read_index(repo).models) == ["hep/pt"]


@pytest.mark.parametrize("damage", ["remove", "corrupt"])
def test_missing_or_corrupt_index_is_rebuilt_from_the_tree(
    publisher: Publisher, make_model: Callable[..., Path], damage: str
) -> None:
    publish_model(publisher, make_model("a"), ref("hep/pt:1"))
    with publisher.transaction() as txn:
        if damage == "remove":
            txn.remove(INDEX_PATH)
        else:
            txn.add_bytes(INDEX_PATH, b"{not json")
        txn.commit()
    publish_model(publisher, make_model("b"), ref("hep/qt:1"))  # must not forget hep/pt
    with reader(publisher) as repo:
        assert check_layout(repo) == []
        assert sorted(read_index(repo).models) == ["hep/pt", "hep/qt"]
        assert scan_models(repo).to_json()["models"] == read_index(repo).to_json()["models"]


def test_list_models_full_reads_every_model_json(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    publish_model(publisher, make_model("a", {"x.bin": b"x", "y.bin": b"y"}), ref("hep/pt:1"))
    with reader(publisher) as repo:
        (summary,) = list_models(repo)
        (full,) = list_models(repo, full=True)
    assert summary.files == [] and summary.file_count == 2
    assert [f.path for f in full.files] == ["x.bin", "y.bin"]


# -- concurrency ------------------------------------------------------------------------------
def test_concurrent_threads_do_not_lose_index_entries(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    sources = {f"team{i}/model{i}:1": make_model(f"m{i}") for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(len(sources))

    def run(name: str, src: Path) -> None:
        try:
            own = Publisher.open(publisher.repo_dir)  # as separate services would
            start.wait()
            publish_model(own, src, ref(name))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in sources.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert publisher.manifest().revision == len(sources)
    with reader(publisher) as repo:
        assert sorted(str(r.ref) for r in list_models(repo)) == sorted(sources)
        assert check_layout(repo) == []


_CHILD = """
import sys
from pathlib import Path
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model, set_alias
from cvmfs_ml.publish.repository import Publisher
repo, src, *names = sys.argv[1:]
publisher = Publisher.open(Path(repo))
for name in names:
    publish_model(publisher, Path(src), ModelRef.parse(name))
    set_alias(publisher, name.split(":")[0], "stable", name.split(":")[1])
"""


def test_concurrent_processes_do_not_lose_index_entries(
    publisher: Publisher, make_model: Callable[..., Path]
) -> None:
    groups = [[f"p{i}/m{j}:1" for j in range(2)] for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(publisher.repo_dir), str(make_model(f"s{i}")), *g],
            stderr=subprocess.PIPE,
        )
        for i, g in enumerate(groups)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    names = sorted(n for g in groups for n in g)
    assert publisher.manifest().revision == 2 * len(names)  # publish + alias each
    with reader(publisher) as repo:
        assert sorted(str(r.ref) for r in list_models(repo)) == names
        assert all(r.aliases == ["latest", "stable"] for r in list_models(repo))
        assert check_layout(repo) == []


def test_long_header_metadata_stays_out_of_model_json() -> None:
    from cvmfs_ml.models.formats import ModelDescription, TensorInfo
    from cvmfs_ml.models.prepare import compact_description as _compact

    desc = ModelDescription(
        format="gguf",
        metadata={"vocab": ["tok"] * 5000, "name": "tiny"},
        inputs=[TensorInfo(f"in{i}", "float32", (1,)) for i in range(100)],
    )
    out = _compact(desc)
    assert out["metadata"] == {"name": "tiny"}
    assert out["metadata_omitted"] == ["vocab"]
    assert len(out["inputs"]) == 64 and out["inputs_count"] == 100
    assert "weights" not in out
