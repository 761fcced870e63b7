"""DUCC's optional ``/.layers/`` and podman's additional image store, from a real registry.

Each layer is unpacked alone (its whiteout files kept), compared with the layer's own tar;
a layer shared by two images is unpacked once and lists both images in ``origin.json``; the
podman store names the images and links each layer ID to its ``layerfs``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.layers import podman_layer_ids
from cvmfs_ml.sync.wishlist import parse_wishlist
from sync.imagebuild import make_layer, published, published_tree
from sync.test_sync_images import base_layers, events_of, push_image, wishlist


def tar_listing(tar: bytes) -> dict[str, Any]:
    """What one layer holds, in :func:`published_tree`'s shape, read with :mod:`tarfile`."""
    out: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            name = member.name.strip("/")
            if member.isdir():
                out[name] = ("dir",)
            elif member.issym():
                out[name] = ("link", member.linkname)
            else:
                source = member if member.isfile() else archive.getmember(member.linkname)
                handle = archive.extractfile(source)
                assert handle is not None
                data = handle.read()
                out[name] = ("file", hashlib.sha256(data).hexdigest(), source.mode & 0o7777)
    for name in list(out):  # folders a layer implies by writing inside them
        while "/" in name:
            name = name.rsplit("/", 1)[0]
            out.setdefault(name, ("dir",))
    return out


def compressed(tar: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(tar, mtime=0)
    return zstandard.ZstdCompressor().compress(tar) if how == "zstd" else tar


@pytest.mark.service
def test_layers_and_podman_store(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    layers = base_layers()
    config_a = push_image(docker_registry, tmp_path, "lib/app", "1", layers)
    top = make_layer([("app", None), ("app/run", b"#!/bin/sh\n")])
    config_b = push_image(docker_registry, tmp_path, "lib/other", "1", [layers[0], (top, "gzip")])
    log = EventLog()
    spec = wishlist(docker_registry, "lib/app:1")
    report = run_round(publisher, spec, SyncOptions(layers=True), log=log)
    assert report.errors == 0 and report.committed
    digests = [f"sha256:{hashlib.sha256(compressed(t, how)).hexdigest()}" for t, how in layers]
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t, _ in layers]
    host = docker_registry.host
    with published(publisher) as repo:
        for (tar, _), digest, diff_id in zip(layers, digests, diff_ids, strict=True):
            folder = f"/.layers/{digest[7:9]}/{digest[7:]}"
            assert repo.stat(f"{folder}/layerfs").is_nested_mountpoint
            # The layer alone, whiteout files included, as its tar holds it.
            assert published_tree(repo, f"{folder}/layerfs") == tar_listing(tar)
            meta = json.loads(repo.read_bytes(f"{folder}/.metadata/layers.json"))
            assert meta["compressed_digest"] == digest and meta["uncompressed_digest"] == diff_id
            assert meta["uncompressed_size"] == len(tar)
            assert json.loads(repo.read_bytes(f"{folder}/.metadata/origin.json")) == [config_a]
        assert repo.exists(f"/.layers/{digests[1][7:9]}/{digests[1][7:]}/layerfs/tmp/.wh.gone")
        # The podman store: the image by its config digest, layers chained, diff -> layerfs.
        images = json.loads(repo.read_bytes("/podmanStore/overlay-images/images.json"))
        ids = podman_layer_ids(diff_ids)
        assert [(i["id"], i["names"], i["layer"]) for i in images] == [
            (config_a[7:], [f"{host}/lib/app:1"], ids[-1])
        ]
        key = "=" + base64.b64encode(config_a.encode()).decode()
        config_blob = repo.read_bytes(f"/podmanStore/overlay-images/{config_a[7:]}/{key}")
        assert f"sha256:{hashlib.sha256(config_blob).hexdigest()}" == config_a
        stored = json.loads(repo.read_bytes("/podmanStore/overlay-layers/layers.json"))
        by_id = {layer["id"]: layer for layer in stored}
        assert set(by_id) == set(ids) and by_id[ids[1]]["parent"] == ids[0]
        assert by_id[ids[2]]["diff-digest"] == diff_ids[2]
        diff = repo.readlink(f"/podmanStore/overlay/{ids[2]}/diff")
        assert diff == f"../../../.layers/{digests[2][7:9]}/{digests[2][7:]}/layerfs"
        assert repo.read_bytes(f"/podmanStore/overlay/{ids[2]}/diff/srv/data.bin")
        short = repo.read_bytes(f"/podmanStore/overlay/{ids[2]}/link").decode()
        assert repo.readlink(f"/podmanStore/overlay/l/{short}") == f"../{ids[2]}/diff"
        lower = repo.read_bytes(f"/podmanStore/overlay/{ids[2]}/lower").decode().split(":")
        assert len(lower) == 2 and lower[1] == "l/" + repo.read_bytes(
            f"/podmanStore/overlay/{ids[0]}/link"
        ).decode()
    # A second image sharing the base layer: that layer is skipped by its digest.
    log = EventLog()
    spec = wishlist(docker_registry, "lib/app:1", "lib/other:1")
    report = run_round(publisher, spec, SyncOptions(layers=True), log=log)
    assert report.errors == 0 and report.committed
    assert [e["layer_digest"] for e in events_of(log, "skip_layer")] == [digests[0]]
    assert len(events_of(log, "publish_layer")) == 1
    with published(publisher) as repo:
        origin = f"/.layers/{digests[0][7:9]}/{digests[0][7:]}/.metadata/origin.json"
        assert json.loads(repo.read_bytes(origin)) == sorted([config_a, config_b])
        images = json.loads(repo.read_bytes("/podmanStore/overlay-images/images.json"))
        assert sorted(i["id"] for i in images) == sorted([config_a[7:], config_b[7:]])
    # Nothing changed: no revision.
    again = run_round(publisher, spec, SyncOptions(layers=True))
    assert not again.committed
    # lib/other leaves the wishlist: its own layer goes with its flat, the shared one stays
    # with one back-link, and the podman store forgets it.
    log = EventLog()
    only_a = wishlist(docker_registry, "lib/app:1")
    report = run_round(publisher, only_a, SyncOptions(layers=True, grace_seconds=0), log=log)
    assert report.errors == 0 and report.committed
    top_digest = hashlib.sha256(gzip.compress(top, mtime=0)).hexdigest()
    top_id = podman_layer_ids([diff_ids[0], f"sha256:{hashlib.sha256(top).hexdigest()}"])[1]
    assert [e["private_path"] for e in events_of(log, "remove_layer")] == [
        f"/.layers/{top_digest[:2]}/{top_digest}"
    ]
    with published(publisher) as repo:
        assert not repo.exists(f"/.layers/{top_digest[:2]}/{top_digest}")
        assert json.loads(repo.read_bytes(origin)) == [config_a]
        images = json.loads(repo.read_bytes("/podmanStore/overlay-images/images.json"))
        assert [i["id"] for i in images] == [config_a[7:]]
        assert not repo.exists(f"/podmanStore/overlay-images/{config_b[7:]}")
        stored = json.loads(repo.read_bytes("/podmanStore/overlay-layers/layers.json"))
        assert {layer["id"] for layer in stored} == set(ids)
        assert not repo.exists(f"/podmanStore/overlay/{top_id}")
        assert repo.exists(f"/podmanStore/overlay/{ids[0]}/diff")


def test_layers_key_in_the_wishlist() -> None:
    assert parse_wishlist("version: 1\nlayers: true\ninput: ['r.io/a:1']\n").layers
    assert not parse_wishlist("version: 1\ninput: ['r.io/a:1']\n").layers
    with pytest.raises(ConfigError, match="'layers' must be true or false"):
        parse_wishlist("version: 1\nlayers: yes-please\ninput: ['r.io/a:1']\n")


@pytest.mark.service
def test_cli_layers_flag(docker_registry: Any, publisher: Publisher, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cvmfs_ml.cli import app

    layer = make_layer([("etc", None), ("etc/motd", b"hi\n")])
    push_image(docker_registry, tmp_path, "lib/tiny", "1", [(layer, "gzip")])
    wishlist_file = tmp_path / "wishlist.yaml"
    wishlist_file.write_text(f"version: 1\ninput: ['http://{docker_registry.host}/lib/tiny:1']\n")
    args = ["sync", str(wishlist_file), "--repo", str(publisher.repo_dir), "--layers"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(gzip.compress(layer, mtime=0)).hexdigest()
    with published(publisher) as repo:
        assert repo.read_bytes(f"/.layers/{digest[:2]}/{digest}/layerfs/etc/motd") == b"hi\n"
        assert repo.exists("/podmanStore/overlay-images/images.json")
