"""Blobs stored while they upload: the publish afterwards reuses them, and what it publishes is
exactly what publishing the file itself makes (same objects, same chunks)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.registry import preingest as preingest_module
from cvmfs_ml.registry.preingest import Preingest

SETTINGS = PublishSettings(
    compression=Compression.AUTO, min_chunk_size=64 * 1024, avg_chunk_size=128 * 1024,
    max_chunk_size=256 * 1024, workers=2,
)  # fmt: skip


def _feed(pre: Preingest, upload_id: str, data: bytes, piece: int = 50_000, start: int = 0) -> None:
    async def run() -> None:
        for offset in range(start, len(data), piece):
            await pre.feed(upload_id, offset, data[offset : offset + piece])

    asyncio.run(run())


def _source(digest: str, name: str) -> dict[str, object]:
    return {"reference": "test", "layers": [{"digest": digest, "as": "file", "path": name}]}


def _layout(publisher: Publisher, path: str) -> tuple[object, ...]:
    with Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public) as r:
        layout = r.layout(path)
        return tuple((p.offset, p.size, p.digest.hex) for p in layout.pieces), layout.chunked


def test_preingested_blob_publishes_the_same_objects_unread(tmp_path: Path) -> None:
    fed = create_repository(tmp_path / "srv", "fed.test", settings=SETTINGS)
    plain = create_repository(tmp_path / "srv", "plain.test", settings=SETTINGS)
    # Compressible and incompressible halves: compression and chunk cuts both matter.
    data = bytes(range(256)) * 2000 + os.urandom(700_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    pre = Preingest(fed)
    try:
        _feed(pre, "a" * 32, data)
        pre.finish("a" * 32, digest, len(data))
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(data)  # laid out after the upload, as pull does
        assert pre.prime(folder, _source(digest, "weights.bin")) == 1
        publish_model(fed, folder, ModelRef("ns", "m", "1"))
        plain_folder = tmp_path / "plain"
        plain_folder.mkdir()
        (plain_folder / "weights.bin").write_bytes(data)
        publish_model(plain, plain_folder, ModelRef("ns", "m", "1"))
    finally:
        pre.close()
    fed_layout = _layout(fed, "/ns/m/1/weights.bin")
    assert fed_layout == _layout(plain, "/ns/m/1/weights.bin")  # the same chunks and objects
    assert fed_layout[1] is True and len(fed_layout[0]) > 3  # chunked: several pieces
    with Repository.open(fed.repo_dir, public_key=fed.keys.paths.master_public) as repo:
        assert repo.read_bytes("/ns/m/1/weights.bin") == data


def test_the_publish_does_not_read_a_preingested_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvmfs_ml.publish.ingest import ContentPipeline

    reused: dict[str, bool] = {}
    real_add = ContentPipeline.add

    def add(self: ContentPipeline, item: object) -> object:  # a spy: the real add runs
        pending = real_add(self, item)  # type: ignore[arg-type]
        reused[item.path] = pending.known is not None  # type: ignore[attr-defined]
        return pending

    monkeypatch.setattr(ContentPipeline, "add", add)
    fed = create_repository(tmp_path / "srv", "fed.test", settings=SETTINGS)
    data = os.urandom(400_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    pre = Preingest(fed)
    try:
        _feed(pre, "b" * 32, data)
        pre.finish("b" * 32, digest, len(data))
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(data)
        assert pre.prime(folder, _source(digest, "weights.bin")) == 1
        publish_model(fed, folder, ModelRef("ns", "m", "1"))
    finally:
        pre.close()
    assert reused["/ns/m/1/weights.bin"] is True  # taken from the file cache, not read
    assert reused["/ns/m/1/model.json"] is False


@pytest.mark.parametrize("fault", ["gap", "not-finished", "other-size", "packed", "abort"])
def test_a_feed_that_is_not_the_whole_blob_is_never_used(tmp_path: Path, fault: str) -> None:
    fed = create_repository(tmp_path / "srv", "fed.test", settings=SETTINGS)
    data = os.urandom(300_000)
    if fault == "packed":
        data = b"\x1f\x8b" + data[2:]  # looks gzipped: a layer to unpack, not fed
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    upload = "c" * 32
    pre = Preingest(fed)
    try:
        if fault == "gap":  # the first piece never came (a restart mid-upload)
            _feed(pre, upload, data, start=50_000)
        else:
            _feed(pre, upload, data)
        if fault == "abort":
            pre.abort(upload)
        if fault != "not-finished":
            size = len(data) + 1 if fault == "other-size" else len(data)
            pre.finish(upload, digest, size)
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(data)
        assert pre.prime(folder, _source(digest, "weights.bin"), timeout=30) == 0
    finally:
        pre.close()


def test_a_stalled_pipeline_gives_the_feed_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = create_repository(tmp_path / "srv", "fed.test", settings=SETTINGS)
    monkeypatch.setattr(preingest_module, "FEED_BYTES", -1)  # always "behind"
    monkeypatch.setattr(preingest_module, "FEED_STALL_SECONDS", 0.0)
    data = os.urandom(2_000_000)
    pre = Preingest(fed)
    try:
        _feed(pre, "d" * 32, data, piece=1_000_000)  # never blocks the caller for long
        pre.finish("d" * 32, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert pre.prime(folder, _source(digest, "weights.bin"), timeout=30) == 0
    finally:
        pre.close()


def test_only_a_bounded_number_of_uploads_are_fed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = create_repository(tmp_path / "srv", "fed.test", settings=SETTINGS)
    monkeypatch.setattr(preingest_module, "MAX_SESSIONS", 1)
    first, second, third = (os.urandom(200_000) for _ in range(3))
    pre = Preingest(fed)
    try:
        _feed(pre, "e" * 32, first[:100_000])  # the first upload is half way
        _feed(pre, "f" * 32, second)  # a second one at the same time: not fed
        pre.finish("f" * 32, "sha256:" + hashlib.sha256(second).hexdigest(), len(second))
        _feed(pre, "e" * 32, first, start=100_000)
        pre.finish("e" * 32, "sha256:" + hashlib.sha256(first).hexdigest(), len(first))
        _feed(pre, "0" * 32, third)  # the slot is free again
        pre.finish("0" * 32, "sha256:" + hashlib.sha256(third).hexdigest(), len(third))
        folder = tmp_path / "model"
        folder.mkdir()
        source: dict[str, object] = {"layers": []}
        for name, data in (("first", first), ("second", second), ("third", third)):
            (folder / name).write_bytes(data)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            source["layers"].append({"digest": digest, "as": "file", "path": name})  # type: ignore[attr-defined]
        assert pre.prime(folder, source, timeout=30) == 2  # first and third, not second
    finally:
        pre.close()
