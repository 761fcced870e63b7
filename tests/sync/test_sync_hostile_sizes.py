"""Sync against registries whose images claim sizes that would exhaust memory or disk.

A manifest ``size`` of 5000 digits (Python refuses to turn it into an ``int``, with a plain
``ValueError`` that once ended the whole round), a sparse tar member (tarfile writes its holes
as zeros: a 1 KiB layer claimed a TiB), a gzip bomb (a few kB unpacking to GiBs), and an image
config declared a GiB long, read whole by ``--layers``. Each must be that image's error event,
one line naming the limit, while the other images of the round are published. Sizes are
claimed, not made: the largest file written here is a few MiB.

Good images and the sparse and bomb layers go through docker-registry (pushed with skopeo);
what it refuses to store is served by :mod:`hostile_registry`.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.models.sources.limits import MAX_CONFIG_BYTES, MAX_LAYERS
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.wishlist import parse_wishlist
from hostile_registry import IMAGE_CONFIG, TAR_GZIP, HostileRegistry, image_manifest
from sync.imagebuild import FQRN, make_layer, published
from sync.test_sync_images import push_image

GOOD = [(make_layer([("etc", None), ("etc/motd", b"good\n")]), "gzip")]


def wishlist_of(*references: str, layers: bool = False) -> Any:
    lines = "\n".join(f"  - 'http://{reference}'" for reference in references)
    text = f"version: 1\ncvmfs_repo: {FQRN}\nlayers: {str(layers).lower()}\ninput:\n{lines}\n"
    return parse_wishlist(text, "wishlist")


def errors_of(log: EventLog) -> dict[str, str]:
    return {str(e.image): str(e.error) for e in log.events if e.status == "error"}


def round_with_one_bad(
    publisher: Publisher, *references: str, layers: bool = False, options: Any = None
) -> tuple[Any, dict[str, str]]:
    """A sync round over ``references`` of which exactly one fails: (report, errors by image)."""
    log = EventLog()
    report = run_round(publisher, wishlist_of(*references, layers=layers), options, log)
    errors = errors_of(log)
    assert report.errors == 1, errors
    return report, errors


def sparse_layer(claimed: int) -> bytes:
    """A tar whose one member is a GNU sparse file of ``claimed`` bytes holding 512 bytes of data
    (PAX ``GNU.sparse`` 0.0 headers, as ``tar --sparse`` writes them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("holes")
        info.size = 512
        info.pax_headers = {
            "GNU.sparse.size": str(claimed),
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.offset": str(claimed - 512),
            "GNU.sparse.numbytes": "512",
        }
        tar.addfile(info, io.BytesIO(b"x" * 512))
    return buffer.getvalue()


def bomb_layer(size: int) -> bytes:
    """A tar of one file of ``size`` zero bytes (gzip makes it about 1/1000 of that)."""
    return make_layer([("zeros", bytes(size))])


def assert_good_published_bad_not(publisher: Publisher, good: str, bad: str) -> None:
    with published(publisher) as repo:
        assert repo.exists(f"/{good}")
        assert not repo.exists(f"/{bad}")
        assert not repo.exists(f"/.metadata/{bad}")
        assert len(repo.listdir("/.flat")) == 1  # the good image's shard only


@pytest.mark.service
def test_a_size_of_5000_digits_fails_its_image_not_the_round(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    push_image(docker_registry, tmp_path, "sizes/good-digits", "1", GOOD)
    with HostileRegistry() as hostile:
        layer = hostile.blob(gzip.compress(make_layer([("a", b"x")]), mtime=0), TAR_GZIP)
        config = hostile.blob(b'{"architecture": "amd64", "os": "linux"}', IMAGE_CONFIG)
        text = json.dumps(image_manifest(config, [layer]))
        hostile.manifest("sizes/digits", "1", text.replace('"size": ', '"size": ' + "9" * 5000, 1)
                         .encode())  # fmt: skip
        good = f"{docker_registry.host}/sizes/good-digits:1"
        bad = f"{hostile.host}/sizes/digits:1"
        report, errors = round_with_one_bad(publisher, bad, good)
    assert "a number with more than 4300 digits" in errors[bad]
    assert "internal error" not in errors[bad]
    assert report.committed
    assert_good_published_bad_not(publisher, good, bad)


@pytest.mark.service
def test_a_sparse_member_is_refused(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    push_image(docker_registry, tmp_path, "sizes/good-sparse", "1", GOOD)
    # 64 MiB claimed (the sweep's layer claimed 1 TiB): what tarfile would write as zeros
    push_image(docker_registry, tmp_path, "sizes/sparse", "1", [(sparse_layer(2**26), "gzip")])
    good = f"{docker_registry.host}/sizes/good-sparse:1"
    bad = f"{docker_registry.host}/sizes/sparse:1"
    _, errors = round_with_one_bad(publisher, bad, good)
    assert "'holes' is a sparse file (declaring 67108864 bytes)" in errors[bad]
    assert errors[bad].startswith("layer sha256:")
    assert_good_published_bad_not(publisher, good, bad)


@pytest.mark.service
@pytest.mark.parametrize("layers", [False, True], ids=["flat", "with-layers"])
def test_a_gzip_bomb_stops_at_the_unpacked_limit(
    docker_registry: Any, publisher: Publisher, tmp_path: Path, layers: bool
) -> None:
    push_image(docker_registry, tmp_path, "sizes/good-bomb", "1", GOOD)
    push_image(docker_registry, tmp_path, "sizes/bomb", "1", [(bomb_layer(8 * 2**20), "gzip")])
    good = f"{docker_registry.host}/sizes/good-bomb:1"
    bad = f"{docker_registry.host}/sizes/bomb:1"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    options = SyncOptions(max_unpacked_bytes=2**21, scratch=scratch)
    _, errors = round_with_one_bad(publisher, bad, good, layers=layers, options=options)
    assert errors[bad].startswith("layer sha256:")
    assert "unpacks to more than 2097152 bytes (at 'zeros')" in errors[bad]
    assert "--max-unpacked-bytes" in errors[bad]
    assert_good_published_bad_not(publisher, good, bad)
    assert not any(scratch.iterdir())  # the round's scratch space is gone


@pytest.mark.service
@pytest.mark.parametrize("layers", [False, True], ids=["flat", "with-layers"])
def test_many_empty_files_stop_at_the_member_limit(
    docker_registry: Any, publisher: Publisher, tmp_path: Path, layers: bool
) -> None:
    """Empty files cost no bytes, so the byte limit never stops them: a 70 MB gzip layer holds
    ten million, an inode and ~1 KB of publisher memory each. Members are counted across the
    image's layers."""
    push_image(docker_registry, tmp_path, "sizes/good-many", "1", GOOD)
    lower = make_layer([("d", None), *((f"d/a{i}", b"") for i in range(30))])
    upper = make_layer([(f"d/b{i}", b"") for i in range(30)])
    push_image(docker_registry, tmp_path, "sizes/many", "1", [(lower, "gzip"), (upper, "gzip")])
    good = f"{docker_registry.host}/sizes/good-many:1"
    bad = f"{docker_registry.host}/sizes/many:1"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    options = SyncOptions(max_members=40, scratch=scratch)
    _, errors = round_with_one_bad(publisher, bad, good, layers=layers, options=options)
    assert errors[bad].startswith("layer sha256:")
    assert "more than 40 tar members counting the layers before it (at 'd/b9')" in errors[bad]
    assert "--max-members" in errors[bad] and "\n" not in errors[bad]
    assert_good_published_bad_not(publisher, good, bad)
    assert not any(scratch.iterdir())


@pytest.mark.service
@pytest.mark.parametrize("layers", [False, True], ids=["flat", "with-layers"])
def test_many_catalog_markers_stop_at_the_catalog_limit(
    docker_registry: Any, publisher: Publisher, tmp_path: Path, layers: bool
) -> None:
    """Each .cvmfscatalog file makes its folder a nested catalog: a few bytes of layer made
    thousands of catalogs (3000 took 12 s to publish, and each is an object clients fetch).
    Markers are counted across the image's layers; folders named .cvmfscatalog are not markers,
    and an image at the limit is published."""
    marker = ".cvmfscatalog"
    lower = make_layer([("a", None), (f"a/{marker}", b""), ("b", None), (f"b/{marker}", b""),
                        ("c", None), (f"c/{marker}", None)])  # fmt: skip
    upper = make_layer([("d", None), (f"d/{marker}", b"")])
    push_image(docker_registry, tmp_path, "sizes/two-catalogs", "1", [(lower, "gzip")])
    push_image(docker_registry, tmp_path, "sizes/catalogs", "1", [(lower, "gzip"), (upper, "gzip")])
    good = f"{docker_registry.host}/sizes/two-catalogs:1"
    bad = f"{docker_registry.host}/sizes/catalogs:1"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    options = SyncOptions(max_catalogs=2, scratch=scratch)
    _, errors = round_with_one_bad(publisher, bad, good, layers=layers, options=options)
    assert errors[bad].startswith("layer sha256:")
    limit = "more than 2 .cvmfscatalog files (nested catalogs) counting the layers before it"
    assert f"{limit} (at 'd/{marker}')" in errors[bad]
    assert "--max-catalogs" in errors[bad] and "\n" not in errors[bad]
    assert_good_published_bad_not(publisher, good, bad)
    assert not any(scratch.iterdir())


@pytest.mark.service
def test_cli_max_unpacked_bytes(docker_registry: Any, publisher: Publisher, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cvmfs_ml.cli import app

    push_image(docker_registry, tmp_path, "sizes/bomb-cli", "1", [(bomb_layer(2**22), "gzip")])
    wishlist_file = tmp_path / "wishlist.yaml"
    wishlist_file.write_text(
        f"version: 1\ninput: ['http://{docker_registry.host}/sizes/bomb-cli:1']\n"
    )
    args = ["sync", str(wishlist_file), "--repo", str(publisher.repo_dir)]
    result = CliRunner().invoke(app, [*args, "--max-unpacked-bytes", str(2**20)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 2, result.stderr  # the error, then the summary
    assert lines[0].startswith(f"error: convert_image {docker_registry.host}/sizes/bomb-cli:1: ")
    assert "unpacks to more than 1048576 bytes" in lines[0]
    assert "Traceback" not in result.output
    # the default limit (1 GiB at least) takes the 4 MiB file
    assert CliRunner().invoke(app, args).exit_code == 0
    with published(publisher) as repo:
        assert repo.exists(f"/{docker_registry.host}/sizes/bomb-cli:1")


def test_layers_refuse_a_config_over_the_limit_before_fetching_it(
    publisher: Publisher,
) -> None:
    with HostileRegistry() as hostile:
        layer = hostile.blob(gzip.compress(make_layer([("a", b"x")]), mtime=0), TAR_GZIP)
        # declared a GiB (the sweep served one; 1.27 GB of memory), served never
        config = {"mediaType": IMAGE_CONFIG, "digest": "sha256:" + "ab" * 32, "size": 2**30}
        hostile.manifest("sizes/bigconfig", "1", image_manifest(config, [layer]))
        bad = f"{hostile.host}/sizes/bigconfig:1"
        report, errors = round_with_one_bad(publisher, bad, layers=True)
        assert not hostile.asked_for(config["digest"])
    assert not report.committed, errors
    assert f"declares {2**30} bytes, more than the limit of {MAX_CONFIG_BYTES}" in errors[bad]
    assert "config sha256:abab" in errors[bad]


@pytest.mark.service
@pytest.mark.parametrize("layers", [False, True], ids=["flat", "with-layers"])
def test_an_image_of_more_layers_than_the_limit_is_refused_before_any_download(
    publisher: Publisher, layers: bool
) -> None:
    """A 16 MiB manifest holds some 80,000 layer descriptors: each was a download, a blob file
    and an unpacking, and with ``layers: true`` a folder with its own nested catalog in
    /.layers, all for one image, again every round it failed. Docker runs at most 127
    layers; more than MAX_LAYERS (1000) refuses the image from its manifest."""
    with HostileRegistry() as hostile:
        tiny = [hostile.blob(gzip.compress(make_layer([(f"f{n}", b"x")]), mtime=0), TAR_GZIP)
                for n in range(MAX_LAYERS + 1)]  # fmt: skip
        config = hostile.blob(b'{"architecture": "amd64", "os": "linux"}', IMAGE_CONFIG)
        hostile.manifest("sizes/layers", "1", image_manifest(config, tiny))
        bad = f"{hostile.host}/sizes/layers:1"
        report, errors = round_with_one_bad(publisher, bad, layers=layers)
        assert not any("/blobs/" in path for path in hostile.requests)
    assert not report.committed
    assert f"{MAX_LAYERS + 1} layers, more than the limit of {MAX_LAYERS}" in errors[bad]


@pytest.mark.service
def test_an_unexpected_error_fails_its_image_not_the_round(
    docker_registry: Any, publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What no check knows yet (here a RuntimeError while resolving one image: a bug, or an input
    nobody thought of) is that image's error event, said to be one to report."""
    import cvmfs_ml.sync.engine as engine

    push_image(docker_registry, tmp_path, "sizes/good-bug", "1", GOOD)
    push_image(docker_registry, tmp_path, "sizes/bug", "1", GOOD)
    real = engine.resolve

    def resolve(client: Any, reference: Any, **kwargs: Any) -> Any:
        if reference.repository == "sizes/bug":
            raise RuntimeError("no check knows this yet")
        return real(client, reference, **kwargs)

    monkeypatch.setattr(engine, "resolve", resolve)
    good = f"{docker_registry.host}/sizes/good-bug:1"
    bad = f"{docker_registry.host}/sizes/bug:1"
    _, errors = round_with_one_bad(publisher, bad, good)
    assert errors[bad] == "internal error (please report): RuntimeError: no check knows this yet"
    with published(publisher) as repo:
        assert repo.exists(f"/{good}") and not repo.exists(f"/{bad}")


def test_image_records_are_read_within_a_bound(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``image.json`` records were read back whole, whatever size their catalog entry says;
    one over the bound is refused before any byte is fetched, and the image is then treated
    as one without a record (converted again), as a record that does not parse is."""
    from cvmfs_ml.sync import images

    record = images.ImageRecord("r.example/lib/a:1", "r.example", "lib/a", "1",
                                "sha256:" + "1" * 64, "sha256:" + "2" * 64,
                                "/.flat/22/" + "2" * 64, 1, "2026-01-01T00:00:00Z")  # fmt: skip
    with publisher.transaction() as txn:
        txn.add_bytes(f"{record.metadata}/{images.IMAGE_JSON}", record.to_bytes())
        txn.commit()
    with published(publisher) as repo:
        assert list(images.read_image_records(repo)) == [record.public_path]
    monkeypatch.setattr(images, "MAX_IMAGE_RECORD_BYTES", 100, raising=False)
    with published(publisher) as repo:
        assert images.read_image_records(repo) == {}
