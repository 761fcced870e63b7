"""``cvmfs-ml model ...`` end to end through the command parser (docs/cli.md contract)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.ingest import model_ingest
from cvmfs_ml.cli.model import model_app
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

# Registered as the real CLI does: ``app.add_typer(model_app, name="model")``.
app = typer.Typer()
app.add_typer(model_app, name="model")
runner = CliRunner()


def cli(*args: str | Path, code: int = 0) -> str:
    """Run ``cvmfs-ml model ARGS``; check the exit code; return stdout."""
    result = runner.invoke(app, ["model", *map(str, args)])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    if code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), result.stderr
        return lines[0]
    return result.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    settings = PublishSettings(compression=Compression.ZLIB)
    return create_repository(tmp_path / "srv", "cli.test", settings=settings).repo_dir


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(50_000))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    return folder


def test_publish_ls_info(repo: Path, src: Path) -> None:
    out = cli("publish", src, "--repo", repo, "--as", "hep/pt:1.0", "-m", "jet tagger")
    assert "revision 1: published hep/pt:1.0 at /hep/pt/1.0 (2 files" in out
    assert "aliases: latest" in out
    again = cli("publish", src, "--repo", repo, "--as", "hep/pt:1.0")
    assert "already published with the same content" in again
    published = json.loads(
        cli("publish", src, "--repo", repo, "--as", "hep/pt:2.0", "--alias", "stable", "--json")
    )
    assert published["published"] is True
    assert published["revision"] == 2
    assert published["aliases"] == ["latest", "stable"]

    rows = json.loads(cli("ls", repo, "--json"))
    assert [(r["ref"], r["aliases"]) for r in rows] == [
        ("hep/pt:1.0", []),
        ("hep/pt:2.0", ["latest", "stable"]),
    ]
    assert rows[0]["license"] == "mit" and rows[0]["description"] == "jet tagger"
    table = cli("ls", repo).splitlines()
    assert table[0].split() == ["MODEL", "VERSION", "FORMAT", "SIZE", "CREATED", "ALIASES"]
    assert table[2].split()[:2] == ["hep/pt", "2.0"]

    info = json.loads(cli("info", repo, "hep/pt", "--json"))  # no version: latest
    assert info["version"] == "2.0"
    assert info["path"] == "/hep/pt/2.0"
    assert sorted(f["path"] for f in info["files"]) == ["README.md", "weights.bin"]
    text = cli("info", repo, "hep/pt:1.0")
    assert "model:        hep/pt:1.0" in text
    assert "weights.bin" in text


def test_alias_rm_and_check(repo: Path, src: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "w.bin").write_bytes(b"other")
    cli("publish", src, "--repo", repo, "--as", "hep/pt:1")
    cli("publish", other, "--repo", repo, "--as", "hep/pt:2", "--no-latest")
    assert json.loads(cli("info", repo, "hep/pt", "--json"))["version"] == "1"
    assert cli("alias", repo, "hep/pt", "latest", "2").strip() == "hep/pt/latest -> 2"
    cli("alias", repo, "hep/pt", "prod", "1")
    assert json.loads(cli("info", repo, "hep/pt:prod", "--json"))["version"] == "1"
    cli("alias", repo, "hep/pt", "prod", "--remove")
    assert json.loads(cli("info", repo, "hep/pt:1", "--json"))["aliases"] == []
    out = cli("rm", repo, "hep/pt:2")
    assert "removed hep/pt:2" in out and "repo gc" in out
    assert [r["ref"] for r in json.loads(cli("ls", repo, "--json"))] == ["hep/pt:1"]
    assert json.loads(cli("check", repo, "--json")) == {"ok": True, "problems": []}
    assert "index rebuilt: 1 models, 1 versions" in cli("reindex", repo)


def test_errors_are_one_line_and_non_zero(repo: Path, src: Path, tmp_path: Path) -> None:
    assert "needs a version" in cli("publish", src, "--repo", repo, "--as", "hep/pt", code=1)
    assert "invalid namespace" in cli("publish", src, "--repo", repo, "--as", "../x:1", code=1)
    cli("publish", src, "--repo", repo, "--as", "hep/pt:1")
    (src / "weights.bin").write_bytes(b"changed")
    err = cli("publish", src, "--repo", repo, "--as", "hep/pt:1", code=1)
    assert "changed: weights.bin" in err
    assert "no such" in cli("info", repo, "hep/nope", code=1)
    # a mistyped version or alias: the error says what the model has
    assert "(in hep/pt, which has 1, latest)" in cli("info", repo, "hep/pt:prdo", code=1)
    assert "no such" in cli("rm", repo, "hep/pt:9", code=1)
    # an alias: the line said "remove it with remove_alias" (a Python function, not a command)
    assert "`cvmfs-ml model alias REPO hep/pt latest --remove`" in cli(
        "rm", repo, "hep/pt:latest", code=1
    )
    assert "invalid alias" in cli("alias", repo, "hep/pt", "a/b", "1", code=1)
    assert "VERSION" in cli("alias", repo, "hep/pt", "beta", code=1)
    assert "no such" in cli("publish", tmp_path / "absent", "--repo", repo, "--as", "a/b:1", code=1)


def test_publish_from_the_hugging_face_cache(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "hub" / "models--cern--tiny"
    commit = "c" * 40
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "x1").write_text('{"a": 1}')
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").symlink_to("../../blobs/x1")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = json.loads(cli("publish", "hf:cern/tiny", "--repo", repo, "--as", "hf/tiny:1", "--json"))
    assert out["source"]["repo_id"] == "cern/tiny"
    assert out["source"]["revision"] == commit
    by_folder = cli("publish", folder, "--revision", "main", "--repo", repo, "--as", "hf/tiny:1")
    assert "nothing to do" in by_folder
    assert "--revision needs" in cli(
        "publish", tmp_path, "--revision", "main", "--repo", repo, "--as", "x/y:1", code=1
    )


def test_ls_and_info_over_http(repo: Path, src: Path) -> None:
    cli("publish", src, "--repo", repo, "--as", "hep/pt:1")
    key = repo.parent.parent / "keys" / "cli.test.pub"
    with RepositoryServer(repo.parent) as server:
        url = f"{server.url}/cvmfs/cli.test"
        rows = json.loads(cli("ls", url, "--key", key, "--json"))
        info = json.loads(cli("info", url, "hep/pt:latest", "--key", key, "--json"))
    assert [r["ref"] for r in rows] == ["hep/pt:1"]
    assert info["version"] == "1" and info["aliases"] == ["latest"]


def test_writing_commands_given_a_url_say_to_use_the_folder(repo: Path, src: Path) -> None:
    """``model publish --repo http://host/cvmfs/<fqrn>`` said "no such file or directory:
    http:/host/cvmfs/<fqrn>/.cvmfspublished (in no repository here)": the URL taken for a
    folder, its '//' folded. Writing needs the repository folder and its keys."""
    with RepositoryServer(repo.parent) as server:
        url = f"{server.url}/cvmfs/cli.test"
        for args in (("publish", src, "--repo", url, "--as", "hep/pt:1"),
                     ("rm", url, "hep/pt:1"), ("alias", url, "hep/pt", "prod", "1"),
                     ("reindex", url)):  # fmt: skip
            line = cli(*args, code=1)
            assert f"{url} is a URL" in line and "repository folder" in line, line
        (src / "MLmodel").write_text("flavors: {}\n")  # model ingest of an MLflow folder
        ingest = typer.Typer()
        ingest.command()(model_ingest)
        result = runner.invoke(ingest, [str(src), "--repo", url, "--as", "hep/pt:1"])
        assert result.exit_code == 1 and f"{url} is a URL" in result.stderr, result.stderr


def test_check_prints_names_from_the_repository_as_text(repo: Path, src: Path) -> None:
    """``model check`` printed each problem raw: an alias whose target holds an escape sequence
    and a newline (anyone's repository) drove the terminal and split the problem line."""
    from cvmfs_ml.publish.repository import Publisher

    cli("publish", src, "--repo", repo, "--as", "hep/pt:1")
    with Publisher.open(repo).transaction() as txn:
        txn.symlink("/hep/pt/evil", "v\x1b]0;owned\x07\nx")
        txn.commit()
    result = runner.invoke(app, ["model", "check", str(repo)], color=True)
    assert result.exit_code == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert len(result.stderr.splitlines()) == len(problems) == 1, result.stderr
    assert "\x1b" not in result.stderr and "v\\x1b]0;owned" in problems[0], result.stderr
