"""Local and Hugging Face cache sources: symlink resolution and its bounds, hashing, model
cards and licenses, the hub cache layout, and publishing a snapshot as plain files.

The hub caches here are built by hand in tmp (the layout of huggingface_hub: blobs named by
SHA-256 for LFS files and git SHA-1 for small ones, relative symlinks from snapshots/); nothing
is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.errors import NotFoundError, UnsafeInputError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.models.sources.huggingface import (
    describe_hf_snapshot,
    find_hf_snapshot,
    hub_cache_dir,
    lookup_cached,
    open_hf_snapshot,
    parse_hf_spec,
    repo_folder_name,
)
from cvmfs_ml.models.sources.local import (
    detect_license,
    hash_tree,
    read_model_card,
    scan_source,
)
from cvmfs_ml.models.tree import check_layout
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings

COMMIT_1 = "a" * 40
COMMIT_2 = "b" * 40


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HfRepo:
    cache: Path
    folder: Path
    files: dict[str, bytes]  # of COMMIT_1


def write_hf_repo(
    cache: Path, repo_id: str, snapshots: dict[str, dict[str, bytes]], refs: dict[str, str]
) -> Path:
    """A hub cache repository folder: blobs once, snapshots as relative symlinks to them."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, files in snapshots.items():
        for rel, data in files.items():
            lfs = len(data) > 100
            blob = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
            (folder / "blobs" / blob).write_bytes(data)
            link = folder / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(folder / "blobs" / blob, link.parent), link)
    for name, commit in refs.items():
        (folder / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(commit)
    (folder / ".no_exist" / COMMIT_1).mkdir(parents=True)  # huggingface_hub writes these too
    return folder


CARD = b"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-classification
tags:
- physics
- "jets"
---
# Tiny jet tagger
"""


@pytest.fixture
def hf_repo(tmp_path: Path) -> HfRepo:
    weights = save({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3)})
    files = {
        "config.json": b'{"model_type": "bert", "hidden_size": 4}',
        "model.safetensors": weights,
        "README.md": CARD,
        "tokenizer/vocab.txt": b"[PAD]\n[UNK]\n" * 20,
    }
    cache = tmp_path / "hub"
    folder = write_hf_repo(
        cache,
        "cern/jet-tagger",
        {COMMIT_1: files, COMMIT_2: {"config.json": b"{}"}},
        {"main": COMMIT_1, "pr/1": COMMIT_2},
    )
    return HfRepo(cache, folder, files)


# -- local sources ------------------------------------------------------------------------------
def test_scan_resolves_internal_symlinks_and_skips_tool_folders(tmp_path: Path) -> None:
    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"weights")
    (src / "alias.bin").symlink_to("sub/w.bin")
    (src / "linked_dir").symlink_to("sub")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / ".cache" / "huggingface").mkdir(parents=True)
    tree = hash_tree(scan_source(src))
    assert [f.path for f in tree.files] == ["alias.bin", "linked_dir/w.bin", "sub/w.bin"]
    assert tree.dirs == ["linked_dir", "sub"]
    assert set(tree.digests().values()) == {hashlib.sha256(b"weights").hexdigest()}
    assert tree.size == 3 * len(b"weights")


@pytest.mark.parametrize("case", ["outside", "dangling", "cycle", "fifo"])
def test_scan_refuses_what_cannot_be_published_safely(tmp_path: Path, case: str) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (tmp_path / "secret").write_text("x")
    if case == "outside":
        (src / "leak").symlink_to(tmp_path / "secret")
    elif case == "dangling":
        (src / "gone").symlink_to("nothing")
    elif case == "cycle":
        (src / "d").mkdir()
        (src / "d" / "up").symlink_to("..")
    else:
        os.mkfifo(src / "pipe")
    with pytest.raises(UnsafeInputError):
        scan_source(src)


def test_scan_single_file_and_missing_source(tmp_path: Path) -> None:
    path = tmp_path / "net.onnx"
    path.write_bytes(b"1234")
    tree = scan_source(path)
    assert [(f.path, f.size) for f in tree.files] == [("net.onnx", 4)]
    assert tree.dirs == []
    with pytest.raises(NotFoundError):
        scan_source(tmp_path / "absent")


def test_model_card_and_license_detection(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_bytes(CARD)
    card = read_model_card(tmp_path)
    assert card["license"] == "apache-2.0"
    assert card["tags"] == ["physics", "jets"]
    assert detect_license(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: cern-ohl\n---\n")
    assert detect_license(tmp_path) == "cern-ohl"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert read_model_card(tmp_path) == {}
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert detect_license(tmp_path) == "mit"
    (tmp_path / "config.json").write_text("[]")
    assert detect_license(tmp_path) is None


# -- the hub cache layout -------------------------------------------------------------------------
def test_find_snapshot_from_snapshot_or_repo_folder(hf_repo: HfRepo) -> None:
    snap = find_hf_snapshot(hf_repo.folder / "snapshots" / COMMIT_1)
    assert snap is not None
    assert (snap.repo_id, snap.repo_type, snap.revision, snap.refs) == (
        "cern/jet-tagger",
        "model",
        COMMIT_1,
        ["main"],
    )
    by_folder = find_hf_snapshot(hf_repo.folder)
    assert by_folder is not None and by_folder.snapshot == snap.snapshot
    pr = open_hf_snapshot(hf_repo.folder, "pr/1")
    assert (pr.revision, pr.refs) == (COMMIT_2, ["pr/1"])
    assert open_hf_snapshot(hf_repo.folder, COMMIT_2).revision == COMMIT_2
    with pytest.raises(NotFoundError, match="cached: main, pr/1"):
        open_hf_snapshot(hf_repo.folder, "v9")
    with pytest.raises(NotFoundError):
        open_hf_snapshot(hf_repo.folder / "snapshots" / COMMIT_1, "pr/1")
    assert find_hf_snapshot(hf_repo.folder / "blobs") is None
    with pytest.raises(NotFoundError, match="hub cache snapshot"):
        open_hf_snapshot(hf_repo.cache)


def test_describe_snapshot_reads_ids_and_model_card(hf_repo: HfRepo) -> None:
    info = describe_hf_snapshot(hf_repo.folder / "snapshots" / COMMIT_1)
    assert info == {
        "type": "huggingface",
        "repo_type": "model",
        "repo_id": "cern/jet-tagger",
        "revision": COMMIT_1,
        "refs": ["main"],
        "license": "apache-2.0",
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["physics", "jets"],
    }


def test_cache_location_and_lookup(
    hf_repo: HfRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub_cache_dir({"HF_HUB_CACHE": "/x", "HF_HOME": "/y"}) == Path("/x")
    assert hub_cache_dir({"HF_HOME": "/y"}) == Path("/y/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/z"}) == Path("/z/huggingface/hub")
    assert repo_folder_name("cern/jet-tagger") == "models--cern--jet-tagger"
    assert parse_hf_spec("hf:cern/jet-tagger@pr/1") == ("cern/jet-tagger", "pr/1")
    assert parse_hf_spec("hf://gpt2") == ("gpt2", None)
    with pytest.raises(ValueError):
        parse_hf_spec("hf:a--b/c")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_repo.cache))
    assert lookup_cached("cern/jet-tagger").revision == COMMIT_1
    with pytest.raises(NotFoundError, match="Hugging Face cache"):
        lookup_cached("cern/other")


# -- publishing a snapshot ----------------------------------------------------------------------
def test_publish_snapshot_as_plain_files(hf_repo: HfRepo, tmp_path: Path) -> None:
    publisher = create_repository(
        tmp_path / "srv", "hf.test", settings=PublishSettings(compression=Compression.ZLIB)
    )
    record = publish_model(publisher, hf_repo.folder, ModelRef.parse("hf/jet-tagger:r1"))
    assert record.source["repo_id"] == "cern/jet-tagger"
    assert record.source["revision"] == COMMIT_1
    assert record.license == "apache-2.0"
    assert record.format == "safetensors"
    assert record.models["model.safetensors"]["parameters"] == 15
    # For LFS files the hub names the blob by the SHA-256 of its content: same as ours.
    weights = hashlib.sha256(hf_repo.files["model.safetensors"]).hexdigest()
    assert (hf_repo.folder / "blobs" / weights).is_file()
    assert record.digests()["model.safetensors"] == weights
    with Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public) as repo:
        for rel, data in hf_repo.files.items():
            entry = repo.stat(f"/hf/jet-tagger/r1/{rel}")
            assert entry.is_regular  # not a symlink into blobs/
            assert repo.read_bytes(entry.path) == data
        assert check_layout(repo) == []


def test_snapshot_symlink_leaving_the_repo_folder_is_refused(
    hf_repo: HfRepo, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere").write_text("not part of the model")
    (hf_repo.folder / "snapshots" / COMMIT_1 / "extra").symlink_to(tmp_path / "elsewhere")
    publisher = create_repository(tmp_path / "srv", "hf.test")
    with pytest.raises(UnsafeInputError, match="outside"):
        publish_model(publisher, hf_repo.folder, ModelRef.parse("hf/jet-tagger:r1"))
    assert publisher.manifest().revision == 0


def test_a_ref_naming_a_folder_outside_the_snapshots_is_refused(
    hf_repo: HfRepo, tmp_path: Path
) -> None:
    """``refs/main`` holding ``../../../secret`` (a hub cache copied from elsewhere) made
    ``model publish hf:ORG/NAME`` publish that folder, here a private key, as the model."""
    secret = hf_repo.cache.parent / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("private")
    (hf_repo.folder / "refs" / "main").write_text("../../../secret")
    publisher = create_repository(tmp_path / "srv", "hf.test")
    with pytest.raises(UnsafeInputError, match="refs/main"):
        lookup_cached("cern/jet-tagger", cache_dir=hf_repo.cache)
    with pytest.raises(UnsafeInputError, match="refs/main"):
        publish_model(publisher, hf_repo.folder, ModelRef.parse("hf/jet-tagger:r1"))
    assert publisher.manifest().revision == 0


def test_a_snapshot_that_is_a_link_out_of_the_cache_is_refused(
    hf_repo: HfRepo, tmp_path: Path
) -> None:
    """``snapshots/<commit>`` itself a link to a folder elsewhere was published as the model:
    only the links inside a snapshot were held to the ``models--*`` folder."""
    secret = hf_repo.cache.parent / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("private")
    commit = "c" * 40
    (hf_repo.folder / "snapshots" / commit).symlink_to(secret)
    (hf_repo.folder / "refs" / "main").write_text(commit)
    publisher = create_repository(tmp_path / "srv", "hf.test")
    with pytest.raises(UnsafeInputError, match="outside"):
        lookup_cached("cern/jet-tagger", cache_dir=hf_repo.cache)
    with pytest.raises(UnsafeInputError, match="outside"):
        publish_model(publisher, hf_repo.folder / "snapshots" / commit, ModelRef.parse("a/b:1"))
    assert publisher.manifest().revision == 0
