"""Boot and trust of freshly published repositories: every refusal has its own error.

Repositories are published with our publisher into a temporary folder and read through the
local store (the HTTP path shares this code and is covered in test_http_integration.py).
Covered: tampered manifest, catalog and object; a manifest signed by a certificate the
whitelist does not list; a wrong master key; an expired whitelist (``now=``); another
repository's manifest; rollback refusal through the breadcrumb in the cache; refresh to a
revision published meanwhile (explicit and on the TTL); pinning a root hash or a tag; cache
copies corrupted on disk being detected and refetched; ``open_configured``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import load_config
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.client.session import open_configured
from cvmfs_ml.cvmfs.manifest import FqrnMismatchError
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    RollbackError,
    SignatureError,
    WhitelistExpiredError,
)
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.storage.http import RepositoryServer
from repos import SMALL_CHUNKS

FQRN = "trust.test"
SETTINGS = SMALL_CHUNKS
BIG = os.urandom(700 * 1024)  # chunked into several P objects


def publish(publisher: Publisher, files: dict[str, bytes], tag: str | None = None) -> None:
    with publisher.transaction() as txn:
        for path, data in files.items():
            txn.add_bytes(path, data)
        txn.commit(tag=tag)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Revision 1 (tag v1): /a.txt, /big.bin (chunked); made once, copied for each test."""
    root = tmp_path_factory.mktemp("template")
    publisher = create_repository(root / "srv", FQRN, settings=SETTINGS)
    publish(publisher, {"/a.txt": b"first", "/big.bin": BIG}, tag="v1")
    return root


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Publisher:
    """A private copy of the template repository (and its keys at srv/../keys)."""
    shutil.copytree(template, tmp_path / "t", symlinks=True)
    return Publisher.open(tmp_path / "t" / "srv" / FQRN)


@pytest.fixture
def connect(repo: Publisher, tmp_path: Path) -> Callable[..., Repository]:
    """``connect(**options)``: a Repository on ``repo`` with the shared cache tmp/cache."""

    def make(**options: object) -> Repository:
        options.setdefault("public_key", repo.keys.paths.master_public)
        options.setdefault("cache", tmp_path / "cache")
        return Repository.open(repo.repo_dir, **options)

    return make


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def other_repository(tmp_path: Path) -> Publisher:
    """Another repository with the same name but its own keys."""
    return create_repository(tmp_path / "other", FQRN, keys_dir=tmp_path / "other-keys")


# ---------------------------------------------------------------- the trust chain


def test_boot_verifies_and_records_the_breadcrumb(
    repo: Publisher, connect: Callable[..., Repository], tmp_path: Path
) -> None:
    with connect() as client:
        assert client.revision == 1
        assert client.read_bytes("/big.bin") == BIG
        assert client.whitelist.fqrn == FQRN
        assert not client.pinned
        manifest = client.manifest
    crumb = (tmp_path / "cache" / f"cvmfschecksum.{FQRN}").read_text()
    assert crumb == f"{manifest.catalog.hex}T{manifest.timestamp}R1"


def test_tampered_manifest_is_refused(repo: Publisher, connect: Callable[..., Repository]) -> None:
    path = repo.repo_dir / ".cvmfspublished"
    path.write_bytes(path.read_bytes().replace(b"\nS1\n", b"\nS7\n", 1))
    with pytest.raises(SignatureError, match=r"\.cvmfspublished: the body does not hash"):
        connect()


def test_manifest_signature_from_another_key_is_refused(
    repo: Publisher, connect: Callable[..., Repository], tmp_path: Path
) -> None:
    """A validly signed manifest whose certificate the whitelist does not list."""
    other = other_repository(tmp_path)
    (repo.repo_dir / ".cvmfspublished").write_bytes(
        (other.repo_dir / ".cvmfspublished").read_bytes()
    )
    cert = other.manifest().certificate
    assert cert is not None
    rel = object_path(cert, ObjectKind.CERTIFICATE)
    (repo.repo_dir / rel).write_bytes((other.repo_dir / rel).read_bytes())
    with pytest.raises(SignatureError, match=r"certificate .* is not listed in \.cvmfswhitelist"):
        connect()


def test_wrong_master_key_is_refused(connect: Callable[..., Repository], tmp_path: Path) -> None:
    other = other_repository(tmp_path)
    with pytest.raises(SignatureError, match=r"\.cvmfswhitelist: signature does not verify"):
        connect(public_key=other.keys.paths.master_public)


def test_no_master_key_is_refused(connect: Callable[..., Repository]) -> None:
    with pytest.raises(SignatureError, match=r"no master public key for trust\.test"):
        connect(public_key=[])


def test_expired_whitelist_is_refused(repo: Publisher, connect: Callable[..., Repository]) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=SETTINGS.whitelist_days + 1)
    with pytest.raises(WhitelistExpiredError, match=r"trust\.test expired"):
        connect(now=later)
    repo.resign(now=later - dt.timedelta(days=1))  # the publisher re-signs: readable again
    with connect(now=later) as client:
        assert client.read_bytes("/a.txt") == b"first"


def test_manifest_of_another_repository_is_refused(connect: Callable[..., Repository]) -> None:
    with pytest.raises(FqrnMismatchError, match=r"expected 'else\.test'"):
        connect(fqrn="else.test")


def test_tampered_catalog_is_refused(repo: Publisher, connect: Callable[..., Repository]) -> None:
    rel = object_path(repo.manifest().catalog, ObjectKind.CATALOG)
    flip_byte(repo.repo_dir / rel, 200)
    with pytest.raises(IntegrityError, match=rel):
        connect()


def test_tampered_object_is_refused(repo: Publisher, connect: Callable[..., Repository]) -> None:
    with connect() as client:
        layout = client.layout("/big.bin")
        rel = object_path(layout.pieces[1].digest, ObjectKind.PARTIAL)
        flip_byte(repo.repo_dir / rel, 1000)
        with pytest.raises(IntegrityError, match=rel):
            client.read_bytes("/big.bin")
        assert client.read_bytes("/a.txt") == b"first"  # the rest stays readable
        assert client.cache.get_path(layout.pieces[1].digest) is None  # nothing bad cached


# ---------------------------------------------------------------- rollback and refresh


def test_older_manifest_after_a_newer_one_is_refused(
    repo: Publisher, connect: Callable[..., Repository], tmp_path: Path
) -> None:
    old_manifest = (repo.repo_dir / ".cvmfspublished").read_bytes()
    publish(repo, {"/a.txt": b"second"})
    with connect() as client:
        assert client.revision == 2
    (repo.repo_dir / ".cvmfspublished").write_bytes(old_manifest)  # a replay, validly signed
    with pytest.raises(RollbackError, match=r"offers revision 1 .* revision 2 .* already seen"):
        connect()
    # The breadcrumb is what refuses: a client with an empty cache accepts revision 1.
    with connect(cache=tmp_path / "fresh-cache") as fresh:
        assert fresh.read_bytes("/a.txt") == b"first"


def test_refresh_switches_to_a_revision_published_meanwhile(
    repo: Publisher, connect: Callable[..., Repository]
) -> None:
    with connect() as client:
        assert client.read_bytes("/a.txt") == b"first"
        assert client.refresh() is False
        publish(repo, {"/a.txt": b"second", "/new.txt": b"new"}, tag="v2")
        assert client.read_bytes("/a.txt") == b"first"  # the open revision does not move
        assert client.refresh() is True
        assert client.revision == 2 and client.manifest.revision == 2
        assert client.read_bytes("/a.txt") == b"second"
        assert client.read_bytes("/new.txt") == b"new"
        assert client.read_bytes("/big.bin") == BIG
        assert {t.name for t in client.tags()} >= {"v1", "v2"}
        assert client.refresh() is False


def test_refresh_refuses_an_older_manifest_and_keeps_its_revision(
    repo: Publisher, connect: Callable[..., Repository]
) -> None:
    old_manifest = (repo.repo_dir / ".cvmfspublished").read_bytes()
    publish(repo, {"/a.txt": b"second"})
    with connect() as client:
        (repo.repo_dir / ".cvmfspublished").write_bytes(old_manifest)
        with pytest.raises(RollbackError, match="offers revision 1"):
            client.refresh()
        assert client.revision == 2 and client.read_bytes("/a.txt") == b"second"
        client.max_ttl = 0.0  # the TTL path logs and keeps the revision instead of raising
        assert client.maybe_refresh() is False
        assert client.revision == 2


def test_ttl_refresh(repo: Publisher, connect: Callable[..., Repository]) -> None:
    with connect() as client:
        assert client.ttl == SETTINGS.ttl == 240  # the root catalog's TTL property
        publish(repo, {"/a.txt": b"second"})
        assert not client.refresh_due
        assert client.maybe_refresh() is False  # within the TTL: not even looked at
        assert client.read_bytes("/a.txt") == b"first"
        client.max_ttl = 0.0  # CVMFS_MAX_TTL caps the catalog's TTL
        assert client.ttl == 0.0 and client.refresh_due
        assert client.maybe_refresh() is True
        assert client.read_bytes("/a.txt") == b"second"


def test_many_refreshes_keep_few_catalogs_open(
    repo: Publisher, connect: Callable[..., Repository]
) -> None:
    with connect() as client:
        for n in range(4):
            publish(repo, {"/a.txt": f"v{n}".encode()})
            assert client.refresh() is True
            assert client.read_bytes("/a.txt") == f"v{n}".encode()
        assert len(client._retired) <= 2  # older generations were closed


# ---------------------------------------------------------------- pinning


def test_pinned_root_hash_and_tag_do_not_move(
    repo: Publisher, connect: Callable[..., Repository]
) -> None:
    first_root = repo.manifest().catalog
    publish(repo, {"/a.txt": b"second"}, tag="v2")
    with connect(root_hash=first_root) as by_hash, connect(tag="v1") as by_tag:
        for client in (by_hash, by_tag):
            assert client.pinned and client.revision == 1
            assert client.read_bytes("/a.txt") == b"first"
            publish(repo, {"/a.txt": b"third"})
            assert client.refresh() is False  # pinned: the tree stays ...
            assert client.manifest.revision > 2  # ... but the manifest (and tags) move on
            assert client.read_bytes("/a.txt") == b"first"
    with pytest.raises(NotFoundError, match="tag nope"):
        connect(tag="nope")


# ---------------------------------------------------------------- cache corruption


def test_corrupt_cache_copies_are_detected_and_refetched(
    repo: Publisher, connect: Callable[..., Repository], tmp_path: Path
) -> None:
    with connect() as client:
        assert client.read_bytes("/big.bin") == BIG
        assert client.read_bytes("/a.txt") == b"first"
        small = client.stat("/a.txt").digest
        pieces = [p.digest for p in client.layout("/big.bin").pieces]
        root = client.root_hash
    cache = ObjectCache(tmp_path / "cache")
    for digest in (small, pieces[0], root):
        flip_byte(cache.path_of(digest), 7)  # same size: only the checksum can tell
    truncated = cache.path_of(pieces[-1])
    truncated.write_bytes(truncated.read_bytes()[:-1])
    before = cache.usage().quarantined
    with connect() as client:  # a new process would see the same: fresh checks
        assert client.read_bytes("/a.txt") == b"first"
        assert client.read_bytes("/big.bin") == BIG
        assert client.cache.usage().quarantined == before + 4
    cache.close()


def test_corrupt_cache_copy_is_refetched_by_an_open_repository(
    repo: Publisher, connect: Callable[..., Repository]
) -> None:
    with connect() as client:
        assert client.read_bytes("/a.txt") == b"first"
        path = client.cache.path_of(client.stat("/a.txt").digest)
        path.write_bytes(b"FIRST")
        assert client.read_bytes("/a.txt") == b"first"
        assert path.read_bytes() == b"first"


# ---------------------------------------------------------------- open_configured


def test_open_configured_uses_servers_keys_cache_and_pins(repo: Publisher, tmp_path: Path) -> None:
    env = {
        "CVMFS_SERVER_URL": "http://127.0.0.1:9/cvmfs/@fqrn@;{url}/cvmfs/@fqrn@",
        "CVMFS_HTTP_PROXY": "DIRECT",
        "CVMFS_PUBLIC_KEY": str(repo.keys.paths.master_public),
        "CVMFS_CACHE_BASE": str(tmp_path / "cvmfs-cache"),
        "CVMFS_QUOTA_LIMIT": "100",
        "CVMFS_MAX_TTL": "2",
        "CVMFS_MAX_RETRIES": "0",
    }
    first_root = repo.manifest().catalog
    publish(repo, {"/a.txt": b"second"})
    with RepositoryServer(repo.repo_dir.parent) as server:
        env["CVMFS_SERVER_URL"] = env["CVMFS_SERVER_URL"].format(url=server.url)
        config = load_config(FQRN, env=env)
        with open_configured(FQRN, config) as client:
            assert client.read_bytes("/a.txt") == b"second"
            assert client.cache.root == tmp_path / "cvmfs-cache" / "shared"
            assert client.cache.quota_bytes == 100 * 2**20
            assert client.ttl == 120.0  # CVMFS_MAX_TTL is in minutes
            assert client.source.current_host.startswith(server.url)  # failed over
        pinned = load_config(FQRN, env={**env, "CVMFS_ROOT_HASH": first_root.hex})
        with open_configured(FQRN, pinned) as client:
            assert client.pinned and client.read_bytes("/a.txt") == b"first"
        tagged = load_config(FQRN, env={**env, "CVMFS_REPOSITORY_TAG": "v1"})
        with open_configured(FQRN, tagged) as client:
            assert client.read_bytes("/a.txt") == b"first"
    with pytest.raises(ConfigError, match="no master public key"):
        open_configured(FQRN, load_config(FQRN, env={"CVMFS_SERVER_URL": "http://x/cvmfs/y"}))
