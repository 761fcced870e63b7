"""Sync of container images into the DUCC layout, against Debian's docker-registry on loopback.

Images are built here as OCI layouts and pushed with ``skopeo copy``; what sync publishes is
compared with an independent unpack (``skopeo copy ... dir:`` plus the tar layers applied with
:mod:`tarfile`, see ``imagebuild.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import urllib3

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.wishlist import parse_wishlist
from fusecheck import fuse_problem
from sync.imagebuild import (
    FQRN,
    independent_unpack,
    make_layer,
    published,
    published_tree,
    push_layout,
    tree_of,
    write_oci_layout,
)


def base_layers() -> list[tuple[bytes, str]]:
    """Three layers (gzip, zstd, plain tar) exercising whiteouts, opaque folders, links, modes."""
    first = make_layer(
        [
            ("etc", None),
            ("etc/hosts", b"127.0.0.1 localhost\n"),
            ("etc/shadow", b"root:*:\n"),
            ("bin", None),
            ("bin/tool", b"#!/bin/sh\necho tool\n"),
            ("bin/sh", "->/bin/tool"),
            ("usr", None),
            ("usr/lib", None),
            ("usr/lib/a.so", b"A" * 5000),
            ("usr/lib/b.so", "=>usr/lib/a.so"),
            ("opt", None),
            ("opt/old", None),
            ("opt/old/x", b"x"),
            ("opt/old/y", b"y"),
            ("tmp", None),
            ("tmp/gone", b"bye"),
            ("root", None),
        ],
        modes={"etc/shadow": 0o000, "bin/tool": 0o755, "root": 0o700},
        owners={"usr/lib/a.so": 1000, "opt/old": 1000},
    )
    second = make_layer(
        [
            ("tmp/.wh.gone", b""),
            ("opt/old/.wh..wh..opq", b""),
            ("opt/old/z", b"z"),
            ("etc/hosts", b"127.0.0.1 localhost sync\n"),
            ("root/.profile", b"PS1=#\n"),
            ("lib", "->usr/lib"),
        ]
    )
    third = make_layer([("srv", None), ("srv/data.bin", os.urandom(300_000))])
    return [(first, "gzip"), (second, "zstd"), (third, "none")]


def push_image(
    registry: Any,
    tmp_path: Path,
    repository: str,
    tag: str,
    layers: list[tuple[bytes, str]],
    label: str = "",
) -> str:
    layout = tmp_path / f"layout-{repository.replace('/', '_')}-{tag}"
    config = write_oci_layout(layout, layers, tag, label=label)
    push_layout(layout, tag, registry.host, repository)
    return config


def wishlist(registry: Any, *images: str, origin: str = "wishlist") -> Any:
    lines = "\n".join(f"  - 'http://{registry.host}/{image}'" for image in images)
    text = f"version: 1\nuser: cvmfs\ncvmfs_repo: {FQRN}\ninput:\n{lines}\n"
    return parse_wishlist(text, origin)


def events_of(log: EventLog, action: str) -> list[dict[str, Any]]:
    return [e.to_json() for e in log.events if e.action == action]


def objects(publisher: Publisher) -> set[str]:
    return {
        os.path.join(folder, name)
        for folder, _, files in os.walk(publisher.repo_dir / "data")
        for name in files
    }


@pytest.mark.service
def test_image_unpacked_flat_equals_independent_unpack(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    config = push_image(docker_registry, tmp_path, "lib/app", "1.0", base_layers())
    log = EventLog(tmp_path / "events.jsonl")
    report = run_round(publisher, wishlist(docker_registry, "lib/app:1.0"), log=log)
    assert report.errors == 0 and report.committed
    assert report.revision_after == report.revision_before + 1

    hexdigest = config.split(":", 1)[1]
    flat = f"/.flat/{hexdigest[:2]}/{hexdigest}"
    public = f"/{docker_registry.host}/lib/app:1.0"
    expected = independent_unpack(docker_registry.host, "lib/app:1.0", tmp_path / "expected")
    with published(publisher) as repo:
        assert repo.readlink(public) == f"../..{flat}"
        assert repo.stat(flat).is_nested_mountpoint  # one nested catalog per flat image
        tree = published_tree(repo, flat)
        manifest = json.loads(
            repo.read_bytes(f"/.metadata/{docker_registry.host}/lib/app:1.0/manifest.json")
        )
        assert manifest["config"]["digest"] == config
        assert repo.stat(f"{flat}/etc/shadow").uid == 0
        # Owners come from the layers: the second layer's opaque whiteout keeps opt/old itself.
        assert (repo.stat(f"{flat}/usr/lib/a.so").uid, repo.stat(f"{flat}/usr/lib/a.so").gid) == (
            1000,
            1000,
        )
        assert repo.stat(f"{flat}/opt/old").uid == 1000 and repo.stat(f"{flat}/opt/old/z").uid == 0
    assert tree == expected
    # The whiteouts did their work; the hard link reads as its target; modes survive.
    assert "tmp/gone" not in tree and {"opt/old/z"} == {p for p in tree if p.startswith("opt/old/")}
    assert tree["usr/lib/b.so"][1] == tree["usr/lib/a.so"][1]
    assert tree["etc/shadow"][2] == 0o000 and tree["bin/tool"][2] == 0o755
    assert tree["bin/sh"] == ("link", "/bin/tool")
    # DUCC's notification keys, one JSON object per line.
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    converted = [e for e in lines if e["action"] == "publish_flat_image"]
    assert converted[0]["public_path"] == public and converted[0]["status"] == "ok"
    assert converted[0]["size_bytes"] > 300_000 and converted[0]["private_path"] == flat


@pytest.mark.service
def test_idempotent_retag_and_new_tag(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    layers = base_layers()
    config = push_image(docker_registry, tmp_path, "lib/app", "1.0", layers)
    first = run_round(publisher, wishlist(docker_registry, "lib/app:*"))
    assert first.committed and first.errors == 0
    before = objects(publisher)

    # Nothing changed: no revision, no object.
    again = run_round(publisher, wishlist(docker_registry, "lib/app:*"))
    assert not again.committed and again.changes == 0
    assert objects(publisher) == before

    # The same image under a new tag: exactly one revision, only a link (no new flat).
    push_image(docker_registry, tmp_path, "lib/app", "stable", layers)
    log = EventLog()
    retag = run_round(publisher, wishlist(docker_registry, "lib/app:*"), log=log)
    assert retag.revision_after == first.revision_after + 1
    assert [e["public_path"] for e in events_of(log, "move_link")] == [
        f"/{docker_registry.host}/lib/app:stable"
    ]
    assert not events_of(log, "publish_flat_image")
    with published(publisher) as repo:
        hexdigest = config.split(":", 1)[1]
        assert repo.readlink(f"/{docker_registry.host}/lib/app:stable").endswith(hexdigest)
        assert len(repo.listdir("/.flat")) == 1

    # A tag moved to new content: one revision, a new flat, the link follows.
    new_config = push_image(
        docker_registry,
        tmp_path,
        "lib/app",
        "stable",
        [*layers, (make_layer([("v2", b"2")]), "gzip")],
    )
    stored = objects(publisher)
    moved = run_round(publisher, wishlist(docker_registry, "lib/app:*"))
    assert moved.revision_after == retag.revision_after + 1
    # Files shared with the first flat are stored once: the only new file objects are the new
    # layer's file and the two metadata files (catalogs, history and the like aside).
    new_files = {o for o in objects(publisher) - stored if not o.endswith(("C", "H", "X", "M"))}
    assert len(new_files) == 3
    with published(publisher) as repo:
        assert repo.readlink(f"/{docker_registry.host}/lib/app:stable").endswith(new_config[7:])
        assert repo.read_bytes(f"/.flat/{new_config[7:9]}/{new_config[7:]}/v2") == b"2"

    # Both tags moved on: the first flat is orphaned, kept for the grace period, then removed.
    push_image(
        docker_registry, tmp_path, "lib/app", "1.0", [*layers, (make_layer([("v2", b"2")]), "gzip")]
    )
    old_flat = f"/.flat/{config[7:9]}/{config[7:]}"
    kept = run_round(
        publisher, wishlist(docker_registry, "lib/app:*"), SyncOptions(grace_seconds=3600)
    )
    assert kept.committed
    with published(publisher) as repo:
        assert repo.exists(old_flat)
    gone = run_round(
        publisher, wishlist(docker_registry, "lib/app:*"), SyncOptions(grace_seconds=0)
    )
    assert gone.committed
    with published(publisher) as repo:
        assert not repo.exists(old_flat) and len(repo.listdir("/.flat")) == 1


@pytest.mark.service
def test_removed_after_grace_then_collected(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    push_image(docker_registry, tmp_path, "lib/keep", "1", base_layers()[:1])
    unique = make_layer([("only-here", os.urandom(200_000))])
    gone_config = push_image(docker_registry, tmp_path, "lib/gone", "1", [(unique, "gzip")])
    both = wishlist(docker_registry, "lib/keep:1", "lib/gone:1")
    assert run_round(publisher, both).errors == 0
    with_gone = objects(publisher)
    public = f"/{docker_registry.host}/lib/gone:1"

    only_keep = wishlist(docker_registry, "lib/keep:1")
    waiting = run_round(publisher, only_keep, SyncOptions(grace_seconds=3600))
    assert not waiting.committed  # inside the grace period: scheduled, nothing removed
    with published(publisher) as repo:
        assert repo.exists(public)

    log = EventLog()
    removed = run_round(publisher, only_keep, SyncOptions(grace_seconds=0), log=log)
    assert removed.committed and events_of(log, "remove_image")
    flat = f"/.flat/{gone_config[7:9]}/{gone_config[7:]}"
    with published(publisher) as repo:
        assert not repo.exists(public) and not repo.exists(flat)
        assert repo.exists(f"/{docker_registry.host}/lib/keep:1")

    # trunk-previous still names the removed image; the next revision lets gc free it.
    push_image(docker_registry, tmp_path, "lib/keep", "2", base_layers()[:1])
    after = run_round(
        publisher, wishlist(docker_registry, "lib/keep:*"), SyncOptions(grace_seconds=0)
    )
    assert after.committed and after.gc_removed
    assert len(with_gone - objects(publisher)) >= 2  # the unique file's chunks went


@pytest.mark.service
def test_hostile_inputs_do_not_stop_the_round(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    push_image(docker_registry, tmp_path, "lib/good", "1", base_layers()[:1])
    push_image(
        docker_registry, tmp_path, "lib/dotdot", "1", [(make_layer([("../escape", b"x")]), "gzip")]
    )
    push_image(
        docker_registry,
        tmp_path,
        "lib/through-link",
        "1",
        [(make_layer([("etc", "->/etc"), ("etc/passwd", b"owned")]), "gzip")],
    )
    push_image(
        docker_registry,
        tmp_path,
        "lib/hardlink",
        "1",
        [(make_layer([("a", "=>../../etc/passwd")]), "gzip")],
    )
    tampered_layer = make_layer([("f", b"original bytes")])
    push_image(docker_registry, tmp_path, "lib/tampered", "1", [(tampered_layer, "none")])
    # Corrupt the stored blob in the registry itself: it serves the file as it is on disk.
    data_file = next(
        p for p in docker_registry.storage.rglob("data") if p.read_bytes() == tampered_layer
    )
    data_file.write_bytes(tampered_layer.replace(b"original", b"ORIGINAL"))

    # Two layers that break while they are decoded: a gzip stream cut short, pushed as it is
    # (so the registry serves exactly the bytes its digest names), and a zstd layer damaged in
    # the registry's storage (decoded as it streams in, before its digest can be checked).
    # Each decoder raises its own type (EOFError, zstandard.ZstdError), which once stopped the
    # whole round.
    whole = make_layer([("big", os.urandom(300_000))])
    cut = gzip.compress(whole, mtime=0)[:-5000]
    push_image(docker_registry, tmp_path, "lib/cut-gzip", "1", [(cut, "none")])
    push_image(docker_registry, tmp_path, "lib/bad-zstd", "1", [(whole, "zstd")])
    zstd_file = next(
        p
        for p in docker_registry.storage.rglob("data")
        if p.read_bytes().startswith(b"\x28\xb5\x2f\xfd")
    )
    damaged = bytearray(zstd_file.read_bytes())
    for i in range(len(damaged) // 3, len(damaged) // 3 + 64):
        damaged[i] ^= 0xA5
    zstd_file.write_bytes(bytes(damaged))

    log = EventLog()
    spec = wishlist(
        docker_registry,
        "lib/dotdot:1",
        "lib/through-link:1",
        "lib/hardlink:1",
        "lib/tampered:1",
        "lib/cut-gzip:1",
        "lib/bad-zstd:1",
        "lib/good:1",
    )
    spec.images.append(
        parse_wishlist("version: 1\ninput: ['http://127.0.0.1:9/lib/x:1']").images[0]
    )
    report = run_round(publisher, spec, log=log)
    errors = {e.image: e.error for e in log.events if e.status == "error"}
    assert report.errors == 7, errors
    assert "'..'" in errors[f"{docker_registry.host}/lib/dotdot:1"]
    assert "symlink" in errors[f"{docker_registry.host}/lib/through-link:1"]
    assert "refusing 'a'" in errors[f"{docker_registry.host}/lib/hardlink:1"]
    assert "sha256" in errors[f"{docker_registry.host}/lib/tampered:1"]
    assert "127.0.0.1:9" in errors["127.0.0.1:9/lib/x:1"]
    assert "gzip stream" in errors[f"{docker_registry.host}/lib/cut-gzip:1"]
    # zstd may decode damaged bytes without noticing; then the digest check catches them
    bad_zstd = errors[f"{docker_registry.host}/lib/bad-zstd:1"]
    assert "zstd stream" in bad_zstd or "sha256" in bad_zstd
    assert report.committed  # the good image went through in the same round
    with published(publisher) as repo:
        assert repo.exists(f"/{docker_registry.host}/lib/good:1")
        for bad in ("dotdot", "through-link", "hardlink", "tampered", "cut-gzip", "bad-zstd"):
            assert not repo.exists(f"/{docker_registry.host}/lib/{bad}:1")
            assert not repo.exists(f"/.metadata/{docker_registry.host}/lib/{bad}:1")
        assert len(repo.listdir("/.flat")) == 1


def test_ducc_wishlist_accepted_as_is() -> None:
    text = (
        """
version: 1
user: cvmfsunpacker
cvmfs_repo: 'unpacked.cern.ch'
output_format: '$(scheme)://gitlab-registry.cern.ch/unpacked/sync/$(image)'
input:
    - 'https://registry.hub.docker.com/library/centos:centos7'
    - 'https://registry.hub.docker.com/atlas/analysisbase:21.2.1*'
    - 'https://gitlab-registry.cern.ch/clange/jetmetanalysis:*'
    - 'registry.hub.docker.com/pyhf/pyhf@sha256:"""
        + "a" * 64
        + """'
"""
    )
    parsed = parse_wishlist(text)
    assert parsed.cvmfs_repo == "unpacked.cern.ch" and len(parsed.images) == 4
    first, wild, all_tags, pinned = parsed.images
    assert (first.registry, first.repository, first.tag_pattern) == (
        "registry.hub.docker.com",
        "library/centos",
        "centos7",
    )
    assert wild.wildcard and wild.matches("21.2.10") and not wild.matches("21.3.1")
    assert all_tags.matches("anything") and pinned.digest == "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 2\ninput: [a.b/c:d]", "'version' must be 1"),
        ("version: 1\ninput: a.b/c", "'input' must be a list"),
        ("version: 1\ninput: ['a.b/c*d:1']", "'*' is allowed in the tag only"),
        ("version: 1\ninput: ['ftp://a.b/c:1']", "unknown scheme"),
        ("version: 1\ninpt: [a.b/c]", "unknown key 'inpt'"),
        ("version: 1\ninput: [a.b/c]\nmodels: [{source: oci://a.b/c:1}]", "'name' is missing"),
        ("version: 1\nmodels: [{source: /x, name: a/b}]", "needs 'version'"),
        ("version: 1\ninput: [: :", "not valid YAML"),
        ("version: 1", "nothing to sync"),
        ("version: 1\nmodels: [{source: oci://a.b/c, name: a/b}]", "'latest' cannot be a version"),
        ("version: 1\nmodels: [{source: s3://x/y, name: a/b}]", "unknown source scheme"),
        ("version: 1\nmodels: [{source: /x, name: a/b, version: '1', colour: red}]", "'colour'"),
    ],
)
def test_malformed_wishlists(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_wishlist(text)
    assert "\n" not in str(info.value)


@pytest.mark.service
def test_two_sync_processes_share_a_repository(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    """Two rounds at once on one repository (as two sync daemons): the sync lock serialises
    them, so the second sees what the first published and makes no revision of its own."""
    push_image(docker_registry, tmp_path, "lib/app", "1", base_layers())
    spec = wishlist(docker_registry, "lib/app:1")
    before = publisher.manifest().revision
    reports: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: reports.append(run_round(Publisher(publisher.repo_dir), spec))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(reports) == 2 and all(r.errors == 0 for r in reports)
    assert sorted(r.changes for r in reports) == [0, 1]
    assert publisher.manifest().revision == before + 1


@pytest.mark.service
def test_pinned_digest_and_size_limit(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    push_image(docker_registry, tmp_path, "lib/app", "1", base_layers())
    response = urllib3.PoolManager().request(
        "HEAD",
        f"{docker_registry.url}/v2/lib/app/manifests/1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    digest = response.headers["Docker-Content-Digest"]
    spec = wishlist(docker_registry, f"lib/app@{digest}")
    log = EventLog()
    too_small = run_round(publisher, spec, SyncOptions(max_bytes=1000), log=log)
    assert too_small.errors == 1 and not too_small.committed
    assert "more than the limit" in next(e.error for e in log.events if e.status == "error")

    assert run_round(publisher, spec).committed
    with published(publisher) as repo:
        assert repo.readlink(f"/{docker_registry.host}/lib/app@{digest}").startswith("../../.flat/")
    again = run_round(publisher, spec, SyncOptions(grace_seconds=0))
    assert not again.committed  # pinned and unchanged: skipped, and not taken for unwanted


@pytest.mark.service
def test_wishlists_sharing_a_repository_remove_only_their_own(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    push_image(docker_registry, tmp_path, "team-a/app", "1", base_layers()[:1])
    push_image(docker_registry, tmp_path, "team-b/app", "1", base_layers()[1:2], label="b")
    assert run_round(publisher, wishlist(docker_registry, "team-a/app:1", origin="a")).committed
    assert run_round(publisher, wishlist(docker_registry, "team-b/app:1", origin="b")).committed
    # Team a's wishlist never named team b's image: a round of it, grace or not, keeps it.
    again = run_round(
        publisher,
        wishlist(docker_registry, "team-a/app:1", origin="a"),
        SyncOptions(grace_seconds=0),
    )
    assert not again.committed
    with published(publisher) as repo:
        assert repo.exists(f"/{docker_registry.host}/team-b/app:1")


@pytest.mark.service
def test_mounted_public_path_is_the_image_tree(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    """What Apptainer is given (``/cvmfs/<repo>/<registry>/<repo>:<tag>``, a plain directory
    tree through a real mount) holds what ``skopeo copy ... dir:`` plus unpacking gives."""
    problem = fuse_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE cannot run: {problem}; CI must provide FUSE")
        pytest.skip(problem)
    if os.geteuid() != 0:
        pytest.skip("the image holds a mode-0000 file only root can read through the mount")
    from cvmfs_ml.client.fuse import mount

    push_image(docker_registry, tmp_path, "lib/app", "1.0", base_layers())
    assert run_round(publisher, wishlist(docker_registry, "lib/app:1.0")).errors == 0
    expected = independent_unpack(docker_registry.host, "lib/app:1.0", tmp_path / "expected")
    point = tmp_path / "mnt"
    point.mkdir()
    handle = mount(
        publisher.repo_dir,
        point,
        public_key=publisher.keys.paths.master_public,
        cache=tmp_path / "cache",
        log_file=tmp_path / "fuse.log",
        timeout=60.0,
    )
    try:
        image = point / docker_registry.host / "lib" / "app:1.0"
        assert image.is_symlink() and image.is_dir()
        # Plus the nested catalog's marker, an empty file upstream shows (and DUCC writes) too.
        marker = {".cvmfscatalog": ("file", hashlib.sha256(b"").hexdigest(), 0o644)}
        assert tree_of(image) == {**expected, **marker}
    finally:
        handle.unmount(timeout=15)
