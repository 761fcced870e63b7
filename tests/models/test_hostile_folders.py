"""Model folders a hostile owner publishes (``model publish``, the ingest every source ends in,
the registry's uploads): refused in one line before anything is written, the previous revision
intact, or published the way a user of a model registry expects.

* ``.cvmfscatalog`` files: each one makes its folder a nested catalog. A folder of 100,000
  nested folders each holding one made 100,000 catalogs (a catalog object each, a connection
  each for every client reading below it). A version holds at most ``MAX_CATALOGS`` of them,
  the bound images, OCI layers and registry tarballs already had.
* a Hugging Face cache whose ``refs/`` names the snapshot's commit 20,000 times (names of 200
  characters) put every name into ``model.json``'s ``source`` and the index every listing
  reads: 4.5 MB of index from one version (past 16 MiB, ``model.json`` no longer reads; past
  64 MiB, every listing falls back to reading each ``model.json``). ``refs`` keeps 64 names,
  cut as model card values are, and says how many there were.
* thousands of tiny model files: each PyTorch or HDF5 file is described in a child process
  (about 0.4 s each on a loaded machine), so 10,000 files of 600 bytes (6 MB, well inside an
  upload) kept one publish describing for over an hour; and each description and warning went
  into ``model.json``. A version describes at most ``MAX_DESCRIBED`` model files, of which
  ``MAX_ISOLATED`` in a child; the rest are named in one warning (descriptions are advisory).
* a folder of more files than a ``model.json`` readers load can list (``MAX_MODEL_JSON_BYTES``,
  16 MiB: about 100,000 files) was published, and its ``model.json`` then failed every reader
  (``model info``, ``model check``, publishing the same version again). It is refused before
  anything is written, saying how many files and what to do.
* folders of links to folders: six levels of ten links each to the next level are a million
  paths in a few kB of folder, and the scan followed every one (hours, gigabytes of memory,
  then a model.json no reader loads). The scan stops past ``MAX_ENTRIES`` files and folders.
* a file replaced by a FIFO after the scan (a folder others can write into, as a drop folder
  is): hashing it opened the FIFO and waited for a writer for ever, and the publisher's own
  read of it did so holding the repository lock. Files are opened without waiting and must
  still be regular files.
* names: a newline or an escape sequence is a legal name, published as it is and shown escaped;
  a name that is not UTF-8 (``\\xff\\xfe.bin``) went into ``model.json`` as lone surrogates
  (``"\\udcff"``), which JSON readers other than Python's refuse or replace, and ``model
  info`` showed it as replacement characters. It is refused, named escaped, in one line.
* a file rewritten between its hashing and the publisher's read of it (a drop folder others
  write into; the lock may be waited for in between) was published with bytes other than the
  SHA-256 ``model.json`` records for it. It must still be what was hashed (inode, size,
  modification and change times) when the publisher opens it and once it has read it.
* what a model file says about itself: a 200 kB safetensors header naming one tensor with 100,000
  characters and a dtype of 100,000 more put 200 kB into its description and 200 kB into a
  warning of ``model.json`` (a thousand such files: past what readers load, so refused). Names,
  dtypes and warnings are cut; lists of external files and dtypes keep 64 entries.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
import zipfile
from pathlib import Path

import pytest

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import PublishError, UnsafeInputError
from cvmfs_ml.models import formats, tree
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import ModelBatch, open_published, prepare_version, publish_model
from cvmfs_ml.models.sources import local
from cvmfs_ml.models.sources.limits import MAX_CATALOGS
from cvmfs_ml.models.sources.local import MAX_LIST_ITEMS, MAX_VALUE_CHARS
from cvmfs_ml.publish.repository import Publisher
from models.cli_repo import cli, repo_with_good_model
from models.test_sources_local_hf import COMMIT_1, write_hf_repo


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return repo_with_good_model(tmp_path, "folders.test")


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    """A new folder at ``path`` holding ``files`` (name: bytes)."""
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def _revision(repo: Path) -> int:
    return Publisher.open(repo).manifest().revision


def _refused(repo: Path, src: Path, *needles: str) -> str:
    """``model publish src`` fails in one line holding ``needles``, nothing published."""
    before = _revision(repo)
    done = cli("model", "publish", src, "--repo", repo, "--as", "t/bad:1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _revision(repo) == before
    listed = cli("model", "ls", repo)
    assert listed.returncode == 0 and "t/good" in listed.stdout and "t/bad" not in listed.stdout
    return lines[0]


def test_too_many_catalog_markers_are_refused_before_anything_is_written(
    repo: Path, tmp_path: Path
) -> None:
    src = tmp_path / "markers"
    for i in range(MAX_CATALOGS + 1):
        folder = src / f"d{i:05d}"
        folder.mkdir(parents=True)
        (folder / ".cvmfscatalog").touch()
    (src / "model.bin").write_bytes(b"weights")
    _refused(repo, src, ".cvmfscatalog", str(MAX_CATALOGS))


def test_markers_within_the_bound_are_nested_catalogs(publisher: Publisher, tmp_path: Path) -> None:
    """What a model owner asks for stays: markers split the version's catalog, as upstream's
    publisher does, up to the bound (``max_catalogs`` sets another)."""
    src = tmp_path / "split"
    for name in ("a", "b", "b/c"):
        (src / name).mkdir(parents=True)
        (src / name / ".cvmfscatalog").touch()
        (src / name / "w.bin").write_bytes(name.encode())
    ref = ModelRef("t", "split", "1")
    with pytest.raises(PublishError, match=r"more than 2 \.cvmfscatalog files"):
        publish_model(publisher, src, ref, max_catalogs=2)
    assert publisher.manifest().revision == 0  # the new repository, nothing published
    publish_model(publisher, src, ref, max_catalogs=3)
    with Repository.open(publisher.store, fqrn=publisher.fqrn,
                         public_key=publisher.keys.paths.master_public) as repo:  # fmt: skip
        for name in ("a", "b", "b/c"):
            assert repo.stat(f"{ref.path}/{name}/.cvmfscatalog").size == 0
            entry = repo.stat(f"{ref.path}/{name}")
            assert entry.is_nested_root or entry.is_nested_mountpoint, name


def test_the_refs_of_a_hub_cache_are_bounded_in_the_source(
    publisher: Publisher, tmp_path: Path
) -> None:
    long = f"{'x' * 200}/{'y' * 100}"  # a ref name longer than a value is kept
    refs = {"main": COMMIT_1, **{f"pr/{i:04d}{long}": COMMIT_1 for i in range(200)}}
    folder = write_hf_repo(tmp_path / "hub", "org/many-refs", {COMMIT_1: {"w.bin": b"w"}}, refs)
    record = publish_model(publisher, folder, ModelRef("t", "refs", "1"))
    listed = record.source["refs"]
    assert len(listed) == MAX_LIST_ITEMS and listed[0] == "main", listed[:3]
    assert all(len(name) <= MAX_VALUE_CHARS for name in listed)
    assert record.source["refs_count"] == 201


def _torch_file(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")


def test_the_model_files_described_are_bounded(
    publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "MAX_DESCRIBED", 4, raising=False)
    monkeypatch.setattr(formats, "MAX_ISOLATED", 2, raising=False)
    src = tmp_path / "many"
    src.mkdir()
    for i in range(4):
        _torch_file(src / f"m{i}.pt")  # described in a child each
    for i in range(3):
        (src / f"s{i}.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    record = publish_model(publisher, src, ModelRef("t", "many", "1"))
    assert sorted(record.models) == ["m0.pt", "m1.pt", "s0.safetensors", "s1.safetensors"]
    assert record.format in ("pytorch", "safetensors") and record.file_count == 7
    said = [w for w in record.warnings if "not described" in w]
    assert len(said) == 1, record.warnings
    assert "3 model files" in said[0] and "m2.pt" in said[0] and "s2.safetensors" in said[0]


def test_a_model_json_readers_would_refuse_is_not_written(
    publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree, "MAX_MODEL_JSON_BYTES", 6000)
    src = tmp_path / "files"
    src.mkdir()
    for i in range(60):  # about 150 bytes each in model.json
        (src / f"f{i:03d}.txt").write_text(str(i))
    with pytest.raises(PublishError) as refused:
        publish_model(publisher, src, ModelRef("t", "files", "1"))
    said = str(refused.value)
    assert "model.json" in said and "more than the 6000 bytes" in said and "60 files" in said
    assert "\n" not in said
    assert publisher.manifest().revision == 0


def test_links_fanning_out_to_folders_are_bounded(
    publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "MAX_ENTRIES", 1000, raising=False)
    src = tmp_path / "fan"
    for level in range(4):
        (src / f"l{level}").mkdir(parents=True)
        if level < 3:
            for i in range(10):
                (src / f"l{level}" / f"to{i}").symlink_to(f"../l{level + 1}")
    (src / "l3" / "w.bin").write_bytes(b"w")  # reached by 1000 paths from l0 alone
    with pytest.raises(PublishError) as refused:
        publish_model(publisher, src, ModelRef("t", "fan", "1"))
    said = str(refused.value)
    assert "more than 1000 files and folders" in said and "links followed" in said, said
    assert publisher.manifest().revision == 0


def test_a_file_that_became_a_fifo_after_the_scan_is_refused_not_waited_for(
    tmp_path: Path,
) -> None:
    src = tmp_path / "swap"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    (src / "w.bin").write_bytes(b"w")
    scanned = local.scan_source(src)
    (src / "w.bin").unlink()
    os.mkfifo(src / "w.bin")  # what another writer of the folder did in between
    outcome: list[BaseException | None] = []

    def hash_it() -> None:
        try:
            local.hash_tree(scanned)
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=hash_it, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # blocked in open(): a writer lets it go, then the test fails
        with open(src / "w.bin", "wb"):
            pass
        worker.join(timeout=60)
        pytest.fail("hashing waited for a writer of the FIFO")
    assert isinstance(outcome[0], UnsafeInputError), outcome
    assert "w.bin" in str(outcome[0]) and "not a regular file" in str(outcome[0])


def test_names_with_newlines_are_published_and_names_not_utf8_refused(
    repo: Path, tmp_path: Path
) -> None:
    src = _folder(tmp_path / "names", {"a\nb.bin": b"a", "c\x1b[2Jd.bin": b"c"})
    done = cli("model", "publish", src, "--repo", repo, "--as", "t/names:1")
    assert done.returncode == 0, done.stderr
    shown = cli("model", "info", repo, "t/names:1")
    assert "a\\x0ab.bin" in shown.stdout and "\x1b" not in shown.stdout, shown.stdout

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "ok.bin").write_bytes(b"ok")
    with open(os.fsencode(odd) + b"/\xff\xfe.bin", "wb") as handle:
        handle.write(b"x")
    line = _refused(repo, odd, "not UTF-8")
    assert "refusing b'\\xff\\xfe.bin'" in line, line


def test_a_file_rewritten_after_it_was_hashed_is_not_published(
    publisher: Publisher, tmp_path: Path
) -> None:
    src = _folder(tmp_path / "drop", {"w.bin": b"hashed bytes"})
    prepared = prepare_version(src, ModelRef("t", "drop", "1"))
    (src / "w.bin").write_bytes(b"other! bytes")  # the same size, written by someone else
    refused = pytest.raises(PublishError, match=r"w\.bin.* changed after it was hashed")
    with refused, publisher.transaction() as txn:
        with open_published(publisher) as repo:
            batch = ModelBatch(txn, repo)
            batch.add_version(prepared)
        batch.finish()
        txn.commit()
    assert publisher.manifest().revision == 0


def test_a_file_rewritten_while_the_publisher_reads_it_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"hashed bytes")
    handle = local.open_regular(path, "w.bin", stamp=local.stamp_of(os.stat(path)))
    assert handle.read(6) == b"hashed"
    path.write_bytes(b"other! bytes")  # while the publisher is half-way through
    with pytest.raises(PublishError, match="changed after it was hashed"):
        handle.close()
    assert handle.closed


def test_what_a_model_file_says_of_itself_is_cut_in_model_json(
    publisher: Publisher, tmp_path: Path
) -> None:
    header = json.dumps({
        "t" + "x" * 100_000: {"dtype": "F" * 100_000, "shape": [1], "data_offsets": [0, 4]},
        **{f"w{i}": {"dtype": f"D{i}", "shape": [1], "data_offsets": [0, 4]} for i in range(100)},
    }).encode()  # fmt: skip
    src = _folder(tmp_path / "loud", {"m.safetensors": struct.pack("<Q", len(header)) + header
                                      + bytes(4)})  # fmt: skip
    record = publish_model(publisher, src, ModelRef("t", "loud", "1"))
    described = json.dumps(record.models["m.safetensors"])
    assert len(described) < 16_384, len(described)
    assert record.warnings and all(len(w) <= 1024 for w in record.warnings), record.warnings
