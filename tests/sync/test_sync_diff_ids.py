"""An image is its layers' content, as its config names it: ``rootfs.diff_ids``.

A flat image is stored under its config digest, and another image with the same config digest
only gets a link to it (DUCC's dedup). The config names each layer's uncompressed digest, but
nothing compared what was unpacked with it: any image in a wishlist could copy a popular
image's config blob (its digest then matches) with layers of its own, and the popular tag, in
the same round or any later one, of any wishlist sharing the repository, was linked to that
file system. Each layer's uncompressed bytes are now hashed as they are unpacked; a layer
that is not what the config names fails its image, and the real one is unpacked.
"""

from __future__ import annotations

import gzip
import json

import pytest

from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import run_round
from cvmfs_ml.sync.events import EventLog
from hostile_registry import IMAGE_CONFIG, TAR_GZIP, HostileRegistry, image_manifest
from sync.imagebuild import make_layer, published, sha256
from sync.test_sync_hostile_sizes import wishlist_of


@pytest.mark.parametrize("layers", [False, True], ids=["flat", "with-layers"])
def test_an_image_claiming_another_images_config_is_refused(
    publisher: Publisher, layers: bool
) -> None:
    good = make_layer([("etc", None), ("etc/os", b"good\n")])
    evil = make_layer([("etc", None), ("etc/os", b"evil\n")])
    config = json.dumps(
        {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha256(good)}"]}}
    ).encode()
    with HostileRegistry() as registry:
        descriptor = registry.blob(config, IMAGE_CONFIG)
        for repository, tar in (("evil/app", evil), ("lib/base", good)):
            layer = registry.blob(gzip.compress(tar, mtime=0), TAR_GZIP)
            registry.manifest(repository, "1", image_manifest(descriptor, [layer]))
        bad, real = f"{registry.host}/evil/app:1", f"{registry.host}/lib/base:1"
        log = EventLog()
        report = run_round(publisher, wishlist_of(bad, real, layers=layers), None, log)
    errors = {str(e.image): str(e.error) for e in log.events if e.action == "convert_image"}
    assert list(errors) == [bad], errors
    assert "not the layer its image config names (rootfs.diff_ids)" in errors[bad]
    assert report.committed
    with published(publisher) as repo:
        assert not repo.exists(f"/{bad}")
        link = repo.readlink(f"/{real}")
        assert repo.read_bytes(f"/{registry.host}/lib/{link}/etc/os") == b"good\n"
