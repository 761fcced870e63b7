"""``replica sync``: a Stratum 1 that serves clients exactly like its Stratum 0.

Sources are the upstream-written reference repository and repositories published here; the
HTTP test syncs from a real nginx and serves the replica with a second one. Failure tests check
that the replica never holds a catalog without its objects and keeps serving its previous
revision when a snapshot fails.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.net import replica_app
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.catalog import Catalog, referenced_objects
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import ObjectKind, inflate, object_path
from cvmfs_ml.errors import (
    IntegrityError,
    LockedError,
    NotFoundError,
    PublishError,
    RollbackError,
    SignatureError,
    WhitelistExpiredError,
)
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.replica.sync import sync_replica
from disks import small_tmpfs
from repos import SMALL_CHUNKS

FQRN = "replica.test"
REF = "ref.test.local"
SETTINGS = SMALL_CHUNKS


def tree(repo: Repository) -> list[tuple[Any, ...]]:
    """Everything a client sees: paths, types, modes, sizes, link targets, content hashes."""
    out = []
    for entry in repo.walk():
        content = None
        if entry.is_regular:
            content = hashlib.sha256(repo.read_bytes(entry.path)).hexdigest()
        target = entry.symlink if entry.is_symlink else None
        out.append((entry.path, entry.mode, entry.size, entry.mtime, target, content))
    return out


def same_view(s0: Path, s1: Path, key: Path, tmp_path: Path, **options: Any) -> None:
    with (
        Repository.open(s0, public_key=key, cache=tmp_path / "c0", **options) as origin,
        Repository.open(s1, public_key=key, cache=tmp_path / "c1", **options) as replica,
    ):
        assert replica.manifest == origin.manifest
        assert replica.root_hash == origin.root_hash
        assert tree(replica) == tree(origin)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stratum 0 at ``cvmfs/<fqrn>`` (keys in ``keys/``): revision 1, tag v1, nested /model."""
    root = tmp_path_factory.mktemp("s0")
    publisher = create_repository(root / "cvmfs", FQRN, settings=SETTINGS)
    src = write_tree(
        tmp_path_factory.mktemp("src"),
        {"model/w.bin": os.urandom(900 * 1024), "model/cfg.json": b"{}\n", "a.txt": b"one\n"},
    )
    with publisher.transaction() as txn:
        txn.add_folder(src / "model", "/model", nested_catalog=True)
        txn.add_bytes("/a.txt", b"one\n")
        txn.symlink("/latest", "model/w.bin")
        txn.commit(tag="v1")
    return root


@pytest.fixture
def s0(template: Path, tmp_path: Path) -> Publisher:
    shutil.copytree(template, tmp_path / "origin", symlinks=True)
    return Publisher.open(tmp_path / "origin" / "cvmfs" / FQRN)


def key_of(publisher: Publisher) -> Path:
    return publisher.keys.paths.master_public


# ---------------------------------------------------------------- the reference repository


def test_replica_of_the_reference_repository_reads_like_it(
    reference_served: Path, reference_repo: Path, tmp_path: Path
) -> None:
    key = reference_repo / "keys" / f"{REF}.pub"
    s1 = tmp_path / "s1" / REF
    report = sync_replica(reference_served, s1, key)
    assert (report.fqrn, report.revision, report.previous_revision) == (REF, 3, None)
    assert set(report.tags) == {"trunk", "trunk-previous", "v1", "v2"}
    for name in (".cvmfspublished", ".cvmfswhitelist"):
        assert (s1 / name).read_bytes() == (reference_served / name).read_bytes()
    # every object the replica holds is byte-identical to the source's
    copied = [p for p in (s1 / "data").rglob("*") if p.is_file() and p.parent.name != "txn"]
    assert len(copied) == report.objects_copied + report.catalogs_copied
    for path in copied:
        assert path.read_bytes() == (reference_served / path.relative_to(s1)).read_bytes()
    for tag in ("v1", "v2"):
        same_view(reference_served, s1, key, tmp_path / tag, tag=tag)
    assert re.fullmatch(  # the text `date --utc` prints, as cvmfs_server writes it
        r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d UTC \d{4}\n",
        (s1 / ".cvmfs_last_snapshot").read_text(),
    )
    status = json.loads((s1 / ".cvmfs_status.json").read_text())
    assert status["last_snapshot"] == (s1 / ".cvmfs_last_snapshot").read_text().strip()
    assert not (s1 / ".cvmfs_is_snapshotting").exists()
    assert not [p for p in (s1 / "data" / "txn").iterdir() if p.name != "replica.lock"]


# ---------------------------------------------------------------- incremental snapshots


def test_second_sync_copies_nothing_and_new_revisions_copy_only_new_objects(
    s0: Publisher, tmp_path: Path
) -> None:
    s1 = tmp_path / "s1" / FQRN
    first = sync_replica(s0.repo_dir, s1, key_of(s0))
    assert first.objects_copied > 8
    assert first.catalogs_copied == 3  # root and /model, and revision 0 (trunk-previous)
    same_view(s0.repo_dir, s1, key_of(s0), tmp_path / "r1")

    again = sync_replica(s0.repo_dir, s1, key_of(s0))
    assert again.up_to_date and again.previous_revision == 1
    assert (again.objects_copied, again.catalogs_copied, again.bytes_copied) == (0, 0, 0)

    with s0.transaction() as txn:  # revision 2: only /a.txt changes (root catalog only)
        txn.add_bytes("/a.txt", b"two\n")
        txn.commit()
    with s0.transaction() as txn:  # revision 3: a new file
        txn.add_bytes("/b.txt", b"three\n")
        txn.commit(tag="v3")
    third = sync_replica(s0.repo_dir, s1, key_of(s0))
    assert (third.previous_revision, third.revision) == (1, 3)
    # two root catalogs (revisions 2 and 3, via previous_revision); /model is unchanged
    assert third.catalogs_copied == 2
    # two file objects, history, certificate (same), meta-info (same): only the new ones
    assert third.objects_copied == 3
    same_view(s0.repo_dir, s1, key_of(s0), tmp_path / "r3")
    with Repository.open(s1, public_key=key_of(s0), cache=tmp_path / "c", tag="v1") as old:
        assert old.read_bytes("/a.txt") == b"one\n"
    # the intermediate revision 2 came along through previous_revision
    with Repository.open(s1, public_key=key_of(s0), cache=tmp_path / "c") as head:
        previous = head.root.previous_revision
        assert previous is not None
    with Repository.open(s1, public_key=key_of(s0), cache=tmp_path / "c", root_hash=previous) as r2:
        assert r2.revision == 2 and r2.read_bytes("/a.txt") == b"two\n"


def test_full_history_copies_earlier_revisions_on_the_first_run(
    s0: Publisher, tmp_path: Path
) -> None:
    with Repository.open(s0.repo_dir, public_key=key_of(s0), cache=tmp_path / "c") as origin:
        revision_0 = origin.root.previous_revision
    assert revision_0 is not None
    for text in (b"two\n", b"three\n"):  # revision 0 is no longer tagged trunk-previous
        with s0.transaction() as txn:
            txn.add_bytes("/a.txt", text)
            txn.commit()
    plain = sync_replica(s0.repo_dir, tmp_path / "plain" / FQRN, key_of(s0))
    assert plain.catalogs_copied == 4  # revisions 3, 2 (trunk-previous), 1 (v1), /model
    assert not (tmp_path / "plain" / FQRN / object_path(revision_0, ObjectKind.CATALOG)).exists()
    full = sync_replica(s0.repo_dir, tmp_path / "full" / FQRN, key_of(s0), full_history=True)
    assert full.catalogs_copied == 5
    with Repository.open(
        tmp_path / "full" / FQRN, public_key=key_of(s0), cache=tmp_path / "c", root_hash=revision_0
    ) as empty:
        assert empty.revision == 0 and empty.listdir("/") == []


# ---------------------------------------------------------------- failures


def test_failed_snapshot_keeps_the_old_revision_and_no_catalog_before_its_objects(
    s0: Publisher, tmp_path: Path
) -> None:
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key_of(s0))
    served_before = (s1 / ".cvmfspublished").read_bytes()
    src = write_tree(tmp_path / "src2", {"w2.bin": os.urandom(500 * 1024)})
    with s0.transaction() as txn:
        txn.add_folder(src, "/model/v2")
        txn.commit()
    with Repository.open(s0.repo_dir, public_key=key_of(s0), cache=tmp_path / "c") as origin:
        nested = origin.root.find_nested("/model")
        assert nested is not None
        victim = object_path(
            origin.layout("/model/v2/w2.bin").pieces[-1].digest, ObjectKind.PARTIAL
        )
        new_root = origin.root_hash
    hidden = tmp_path / "hidden"
    shutil.move(s0.repo_dir / victim, hidden)
    with pytest.raises(NotFoundError, match=victim):
        sync_replica(s0.repo_dir, s1, key_of(s0), workers=2)
    assert (s1 / ".cvmfspublished").read_bytes() == served_before
    assert not (s1 / object_path(nested.digest, ObjectKind.CATALOG)).exists()
    assert not (s1 / object_path(new_root, ObjectKind.CATALOG)).exists()
    with Repository.open(s1, public_key=key_of(s0), cache=tmp_path / "c1") as replica:
        assert replica.revision == 1 and replica.read_bytes("/a.txt") == b"one\n"
    shutil.move(hidden, s0.repo_dir / victim)
    report = sync_replica(s0.repo_dir, s1, key_of(s0))
    assert report.revision == 2 and report.objects_present > 0  # resumed, not restarted
    same_view(s0.repo_dir, s1, key_of(s0), tmp_path / "after")


def test_every_catalog_in_the_replica_has_all_its_objects(s0: Publisher, tmp_path: Path) -> None:
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key_of(s0))
    catalogs = list((s1 / "data").rglob("*C"))
    assert len(catalogs) == 3
    for path in catalogs:
        plain = tmp_path / f"{path.name}.db"
        plain.write_bytes(inflate(path.read_bytes()))
        with Catalog(plain) as catalog:
            for digest, is_chunk, _ in referenced_objects(catalog):
                kind = ObjectKind.PARTIAL if is_chunk else ObjectKind.FILE
                assert (s1 / object_path(digest, kind)).is_file()
            for ref in catalog.nested_catalogs():
                assert (s1 / object_path(ref.digest, ObjectKind.CATALOG)).is_file()


def test_tampered_upstream_object_is_refused(s0: Publisher, tmp_path: Path) -> None:
    with Repository.open(s0.repo_dir, public_key=key_of(s0), cache=tmp_path / "c") as origin:
        digest = origin.stat("/a.txt").digest
    assert isinstance(digest, Digest)
    rel = object_path(digest, ObjectKind.FILE)
    path = s0.repo_dir / rel
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    s1 = tmp_path / "s1" / FQRN
    with pytest.raises(IntegrityError, match=rel):
        sync_replica(s0.repo_dir, s1, key_of(s0))
    assert not (s1 / ".cvmfspublished").exists()
    assert not (s1 / rel).exists()


def test_untrusted_or_forbidden_upstreams_are_refused(s0: Publisher, tmp_path: Path) -> None:
    s1 = tmp_path / "s1" / FQRN
    other = create_repository(tmp_path / "other", "x.test", keys_dir=tmp_path / "other-keys")
    with pytest.raises(SignatureError, match="does not verify"):
        sync_replica(s0.repo_dir, s1, key_of(other))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=SETTINGS.whitelist_days + 1)
    with pytest.raises(WhitelistExpiredError):
        sync_replica(s0.repo_dir, s1, key_of(s0), now=later)
    assert not (s1 / ".cvmfspublished").exists()
    (s0.repo_dir / ".cvmfs_master_replica").unlink()
    with pytest.raises(PublishError, match="does not allow replication"):
        sync_replica(s0.repo_dir, s1, key_of(s0))


def test_an_older_upstream_is_refused(s0: Publisher, tmp_path: Path) -> None:
    old = (s0.repo_dir / ".cvmfspublished").read_bytes()
    with s0.transaction() as txn:
        txn.add_bytes("/a.txt", b"two\n")
        txn.commit()
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key_of(s0))
    (s0.repo_dir / ".cvmfspublished").write_bytes(old)
    with pytest.raises(RollbackError, match=r"offers revision 1 .* revision 2 .*the replica has"):
        sync_replica(s0.repo_dir, s1, key_of(s0))
    assert b"\nS2\n" in (s1 / ".cvmfspublished").read_bytes()


def test_concurrent_snapshots_of_one_replica_are_refused(s0: Publisher, tmp_path: Path) -> None:
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key_of(s0))
    with open(s1 / "data" / "txn" / "replica.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="another replica sync"):
            sync_replica(s0.repo_dir, s1, key_of(s0))


# ---------------------------------------------------------------- over HTTP, with nginx


@pytest.mark.service
def test_stratum_1_from_http_serves_clients_like_the_stratum_0(
    s0: Publisher, nginx_factory: Any, tmp_path: Path
) -> None:
    origin = nginx_factory(s0.repo_dir.parent.parent)
    s1_root = tmp_path / "stratum1"
    s1 = s1_root / "cvmfs" / FQRN
    report = sync_replica(origin.repo_url(FQRN), s1, key_of(s0), workers=4)
    assert report.revision == 1 and report.objects_copied > 8
    replica = nginx_factory(s1_root)
    key = key_of(s0)
    with (
        Repository.open(origin.repo_url(FQRN), public_key=key, cache=tmp_path / "a") as a,
        Repository.open(replica.repo_url(FQRN), public_key=key, cache=tmp_path / "b") as b,
    ):
        expected = tree(a)
        assert b.manifest == a.manifest and tree(b) == expected
    # The replica alone serves a client: nothing reaches the Stratum 0 any more.
    # (requests_so_far: every request answered so far, none still on its way to the log)
    before = len(origin.requests_so_far())
    servers = f"{replica.url}/cvmfs/@fqrn@;{origin.url}/cvmfs/@fqrn@"
    with Repository.open(servers, FQRN, key, cache=tmp_path / "c") as client:
        assert tree(client) == expected
        assert client.source.stats.failovers == 0
    assert len(origin.requests_so_far()) == before
    # A second snapshot asks the Stratum 0 for the root files only.
    sync_replica(origin.repo_url(FQRN), s1, key_of(s0))
    new = [r.path for r in origin.requests_so_far()[before:]]
    assert any(p.endswith("/.cvmfspublished") for p in new)
    assert [p for p in new if "/data/" in p and not p.endswith("X")] == []  # X: verification


# ---------------------------------------------------------------- the command line


def test_cli_replica_sync(s0: Publisher, tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(replica_app, name="replica")
    s1 = tmp_path / "s1" / FQRN
    args = ["replica", "sync", str(s0.repo_dir), str(s1), "--key", str(key_of(s0))]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["revision"] == 1 and report["objects_copied"] > 0 and not report["up_to_date"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and f"{FQRN}: up to date" in again.output
    missing = CliRunner().invoke(app, ["replica", "sync", str(tmp_path / "nope"), str(s1)])
    assert missing.exit_code == 1


def test_cli_replica_sync_onto_a_full_disk(s0: Publisher, tmp_path: Path) -> None:
    """A Stratum 1's disk that fills up: one line naming the replica's disk, nothing about
    ``repo gc`` (a Stratum 0's remedy); what was copied stays, and the next sync, with room,
    reuses it and completes."""
    app = typer.Typer()
    app.add_typer(replica_app, name="replica")
    with small_tmpfs(tmp_path / "disk", "512k") as disk:
        s1 = disk / FQRN
        args = ["replica", "sync", str(s0.repo_dir), str(s1), "--key", str(key_of(s0))]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "replica" in lines[0] and "full" in lines[0], lines
        assert "repo gc" not in lines[0] and str(s1) in lines[0]
        assert not (s1 / ".cvmfspublished").exists()  # nothing is served half-copied
        kept = [p for p in (s1 / "data").glob("[0-9a-f][0-9a-f]/*") if p.is_file()]
        assert kept and all(  # each one whole: what it holds is what it is named for
            p.read_bytes() == (s0.repo_dir / p.relative_to(s1)).read_bytes() for p in kept
        )
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True, timeout=30)
        again = CliRunner().invoke(app, [*args, "--json"])
        assert again.exit_code == 0, again.output
        report = json.loads(again.stdout)
        assert report["revision"] == 1 and report["objects_present"] >= len(kept)
