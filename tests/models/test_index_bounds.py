"""``index.json`` and ``model.json`` come from anyone's repository: every reader bounds them.

A hostile (or hand-edited) repository could publish an index or a ``model.json`` of gigabytes,
which each reader (``model ls``/``info``/``check``, the publisher reading back the index) loaded
whole. The catalog entry's size is checked first against a generous cap; the caps are lowered
here so the files stay small.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.model import model_app
from cvmfs_ml.errors import FormatError
from cvmfs_ml.models import tree
from cvmfs_ml.models.layout import INDEX_PATH, ModelRef
from cvmfs_ml.models.publish import list_models, open_published, publish_model
from cvmfs_ml.publish.repository import Publisher, create_repository

app = typer.Typer()
app.add_typer(model_app, name="model")
runner = CliRunner()


def cli(*args: str | Path, code: int = 0) -> tuple[str, str]:
    """``cvmfs-ml model ARGS``: its exit code checked, (stdout, stderr) returned."""
    result = runner.invoke(app, ["model", *map(str, args)])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result.stdout, result.stderr


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    publisher = create_repository(tmp_path / "srv", "bounds.test")
    for version in ("1", "2"):
        src = tmp_path / f"src{version}"
        src.mkdir()
        (src / "w.bin").write_bytes(version.encode() * 100)
        publish_model(publisher, src, ModelRef.parse(f"t/a:{version}"))
    return publisher


def _replace(publisher: Publisher, path: str, data: bytes) -> None:
    with publisher.transaction() as txn:
        txn.add_bytes(path, data)
        txn.commit()


def _padded(publisher: Publisher, path: str, size: int) -> None:
    """The file at ``path`` as it is, padded with spaces to ``size`` bytes (still valid JSON)."""
    with open_published(publisher) as repo:
        data = repo.read_bytes(path)
    _replace(publisher, path, data + b" " * (size - len(data)))


def test_an_oversized_model_json_is_refused_in_one_line(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree, "MAX_MODEL_JSON_BYTES", 4000, raising=False)
    _padded(publisher, "/t/a/2/model.json", 5000)
    _, err = cli("info", publisher.repo_dir, "t/a:2", code=1)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), err
    assert "/t/a/2/model.json: 5000 bytes, more than the 4000" in lines[0], err
    assert "Traceback" not in err
    out, _ = cli("info", publisher.repo_dir, "t/a:1", "--json")  # the other one still reads
    assert json.loads(out)["version"] == "1"


def test_an_oversized_index_is_refused_and_the_publisher_rebuilds_it(
    publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree, "MAX_INDEX_BYTES", 8000, raising=False)
    _padded(publisher, INDEX_PATH, 9000)
    with open_published(publisher) as repo, pytest.raises(FormatError) as caught:
        tree.read_index(repo)
    assert "9000 bytes, more than the 8000" in str(caught.value)
    assert "not an index cvmfs-ml writes" in str(caught.value)
    # ``model check`` reads it too: one line, not a load of the whole file
    _, err = cli("check", publisher.repo_dir, code=1)
    assert "9000 bytes, more than the 8000" in err and "Traceback" not in err
    # The publisher counts an oversized index as broken: rebuilt from the tree on the next change.
    src = tmp_path / "src3"
    src.mkdir()
    (src / "w.bin").write_bytes(b"3" * 100)
    publish_model(publisher, src, ModelRef.parse("t/a:3"))
    with open_published(publisher) as repo:
        assert repo.stat(INDEX_PATH).size < 8000
        assert [str(r.ref) for r in list_models(repo)] == ["t/a:1", "t/a:2", "t/a:3"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"garbage", "not JSON"),
        (b'{"schema": "cvmfs-ml.index/1", "models": {"t/a": {"versions": {"1": {"size": "big"}}}}}',
         "bad model record for t/a:1"),
        (b'{"schema": "cvmfs-ml.index/1", "models": {"t/a": {"versions": {"1": {"format": 5}}}}}',
         "'format' of t/a:1 is not a string"),
        (None, "9000 bytes, more than the 8000"),
    ],
)  # fmt: skip
def test_ls_lists_from_the_tree_when_the_index_does_not_read(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch, body: bytes | None, said: str
) -> None:
    monkeypatch.setattr(tree, "MAX_INDEX_BYTES", 8000, raising=False)
    if body is None:
        _padded(publisher, INDEX_PATH, 9000)
    else:
        _replace(publisher, INDEX_PATH, body)
    out, err = cli("ls", publisher.repo_dir, "--json")
    rows = json.loads(out)
    assert [(r["ref"], r["size"], r["aliases"]) for r in rows] == [
        ("t/a:1", 100, []),
        ("t/a:2", 100, ["latest"]),
    ]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: warning: "), err
    assert said in lines[0] and "cvmfs-ml model reindex" in lines[0], err
    # ``model check`` names the index as the problem (one that does not parse: with what to do)
    _, err = cli("check", publisher.repo_dir, code=1)
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    if body is None or body == b"garbage":
        assert len(problems) == 1 and "cvmfs-ml model reindex" in problems[0], err
    else:
        assert "problem: t/a:1: index entry differs from model.json" in problems, err
    # and the repair works
    cli("reindex", publisher.repo_dir)
    _, err = cli("ls", publisher.repo_dir)
    assert err == ""


def test_a_version_takes_a_bounded_entry_in_the_index(publisher: Publisher, tmp_path: Path) -> None:
    """What a source says about itself went into the index whole: an OCI push's manifest
    annotations and layer list, a description or licence from its config (a config blob may
    be 4 MiB). 16 such pushes made an index past 64 MiB, which no reader loads, so every
    listing read each model.json instead. The index keeps short values; model.json keeps all."""
    src = tmp_path / "src3"
    src.mkdir()
    (src / "w.bin").write_bytes(b"3")
    source = {
        "type": "oci", "reference": "registry.example/org/m:v3", "tag": "v3",
        "manifest_digest": "sha256:" + "ab" * 32,
        "annotations": {f"org.example.k{i}": "v" * 1000 for i in range(200)},
        "layers": [{"digest": "sha256:" + "cd" * 32, "title": f"f{i}"} for i in range(2000)],
    }  # fmt: skip
    ref = ModelRef.parse("t/a:3")
    publish_model(publisher, src, ref, source=source, description="d" * 300_000,
                  license="l" * 100_000)  # fmt: skip
    with open_published(publisher) as repo:
        entry = json.loads(repo.read_bytes(INDEX_PATH))["models"]["t/a"]["versions"]["3"]
        assert len(json.dumps(entry)) < 8192, len(json.dumps(entry))
        assert entry["source"]["manifest_digest"] == source["manifest_digest"]
        assert entry["source"]["omitted_from_index"] == ["annotations", "layers"]
        assert entry["description"].startswith("ddd") and entry["description"].endswith("…")
        full = tree.read_record(repo, ref)  # model.json has it all
        assert full.source == source and len(full.description) == 300_000
    listed = {str(r.ref): r for r in list_models_from(publisher)}
    assert listed["t/a:3"].source["tag"] == "v3"
    cli("check", publisher.repo_dir)  # the index still agrees with the tree


def list_models_from(publisher: Publisher) -> list:
    with open_published(publisher) as repo:
        return list_models(repo)


def test_an_index_written_before_the_bound_still_checks(publisher: Publisher) -> None:
    """An index entry written whole (before entries were bounded) is not a disagreement for
    ``model check``: it says the same as model.json, only longer."""
    with open_published(publisher) as repo:
        index = json.loads(repo.read_bytes(INDEX_PATH))
        record = tree.read_record(repo, ModelRef.parse("t/a:1"))
    long = {**record.source, "annotations": {"k": "v" * 5000}}
    record.source = long
    _replace(publisher, "/t/a/1/model.json", record.to_bytes())
    index["models"]["t/a"]["versions"]["1"]["source"] = long  # as the old publisher wrote it
    _replace(publisher, INDEX_PATH, json.dumps(index).encode())
    cli("check", publisher.repo_dir)
    index["models"]["t/a"]["versions"]["1"]["source"] = {**long, "type": "other"}
    _replace(publisher, INDEX_PATH, json.dumps(index).encode())
    out, err = cli("check", publisher.repo_dir, code=1)
    assert "t/a:1: index entry differs from model.json" in out + err
