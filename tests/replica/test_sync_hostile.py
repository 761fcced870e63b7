"""``replica sync`` from a hostile Stratum 0: every body bounded before it reaches the disk.

A small threaded ``http.server`` on loopback serves a freshly published repository, except that
one path is spoiled: its body is far larger than anything the replica should accept, sent
without a length and ended by closing the connection. The replica must stop reading at its
bound, keep nothing of it, and leave the revision it serves untouched.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.errors import DownloadError
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.replica.sync import sync_replica
from quiet_http import QuietHTTPServer
from signed_spoils import publish_spoiled

FQRN = "hostile-s0.test"
SPOILED_BYTES = 64 * 2**20  # what the spoiled path sends: far beyond the (lowered) bound
BOUND = 2**20  # MAX_UNSIZED_OBJECT for these tests: 2 GiB would take too long to exceed


@pytest.fixture
def s0(tmp_path: Path) -> Publisher:
    """A Stratum 0 at revision 1 (tag v1), one per test: some tests publish on it."""
    publisher = create_repository(tmp_path / "s0", FQRN, settings=PublishSettings(workers=1))
    with publisher.transaction() as txn:
        txn.add_bytes("/a.txt", b"one\n")
        txn.commit(tag="v1")
    return publisher


class _Spoiling(http.server.BaseHTTPRequestHandler):
    """Serves the repository folder; ``spoil`` (a path below it) gets an oversized body."""

    protocol_version = "HTTP/1.1"
    folder: Path
    spoil: str
    sent: list[int]  # bytes of the spoiled body written before the client hung up

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:
        rel = self.path.split(f"/cvmfs/{FQRN}/", 1)[-1]
        try:
            if rel == self.spoil:
                self._oversized()
            elif (self.folder / rel).is_file():
                data = (self.folder / rel).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _oversized(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = bytes(2**16)
        sent = 0
        self.sent.append(0)
        while sent < SPOILED_BYTES:
            self.wfile.write(block)
            sent += len(block)
            self.sent[-1] = sent


@pytest.fixture
def spoiling(s0: Publisher) -> Iterator[Callable[[str], tuple[str, list[int]]]]:
    servers: list[QuietHTTPServer] = []

    def start(spoil: str) -> tuple[str, list[int]]:
        sent: list[int] = []
        attributes = {"folder": s0.repo_dir, "spoil": spoil, "sent": sent}
        server = QuietHTTPServer(("127.0.0.1", 0), type("Handler", (_Spoiling,), attributes))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/cvmfs/{FQRN}", sent

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", [ObjectKind.HISTORY, ObjectKind.METAINFO])
def test_an_endless_history_or_meta_info_cannot_fill_the_replicas_disk(
    s0: Publisher,
    spoiling: Callable[[str], tuple[str, list[int]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: ObjectKind,
) -> None:
    """Before, the history database and the meta-info object (no catalog gives their size)
    were copied with no bound at all: a Stratum 0 answering them with an endless body filled
    the replica's disk (4.5 GB in 20 s on loopback). They now get the bound every other
    unsized object has (MAX_UNSIZED_OBJECT), and the download stops there."""
    monkeypatch.setattr("cvmfs_ml.replica.sync.MAX_UNSIZED_OBJECT", BOUND)
    key = s0.keys.paths.master_public
    s1 = tmp_path / "s1" / FQRN
    if kind is ObjectKind.HISTORY:  # a replica at revision 1, serving it meanwhile
        sync_replica(s0.repo_dir, s1, key)
        with s0.transaction() as txn:  # revision 2 brings a new history database
            txn.add_bytes("/a.txt", b"two\n")
            txn.commit(tag="v2")
    manifest = s0.manifest()
    digest = manifest.history if kind is ObjectKind.HISTORY else manifest.metainfo
    assert digest is not None and not (s1 / object_path(digest, kind)).exists()
    url, sent = spoiling(object_path(digest, kind))
    with pytest.raises(DownloadError, match=r"larger than \d+ bytes"):
        sync_replica(url, s1, key, max_retries=0, backoff_init=0.0)
    assert sent and all(n < SPOILED_BYTES for n in sent), sent  # it hung up on the body
    assert not (s1 / object_path(digest, kind)).exists()
    assert [p.name for p in (s1 / "data" / "txn").iterdir()] == ["replica.lock"]
    if kind is ObjectKind.METAINFO:
        assert not (s1 / ".cvmfspublished").exists()  # a new replica: nothing served yet
        return
    with Repository.open(s1, public_key=key, cache=tmp_path / "c") as replica:
        assert replica.revision == 1 and replica.read_bytes("/a.txt") == b"one\n"


@pytest.mark.parametrize(
    ("column", "value"),
    [("revision", "x"), ("timestamp", b"\x00"), ("name", b"v1"), ("revision", -1),
     ("description", b"\xff"), ("size", 1.5)],
)  # fmt: skip
def test_a_history_with_wrong_column_types_is_refused_on_one_line(
    s0: Publisher, tmp_path: Path, column: str, value: object
) -> None:
    """Before, a tag whose revision was text ('x') or whose timestamp was a blob stopped
    ``replica sync``, ``repo check`` and ``repo tags`` with a ValueError traceback (a name
    that is not text, a negative revision or a fractional size went through). Each column is
    now checked as it is read: FormatError naming the tag and the column, on one line; the
    replica keeps its revision and ``repo check`` reports it with the rest."""
    from cvmfs_ml.client.check import check_repository

    key = s0.keys.paths.master_public
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key)
    sql = f"UPDATE tags SET {column} = ? WHERE name = 'v1'"
    publish_spoiled(s0, tmp_path, ObjectKind.HISTORY, sql, (value,))
    for args in (
        ["replica", "sync", str(s0.repo_dir), str(s1), "--key", str(key)],
        ["repo", "tags", str(s0.repo_dir), "--key", str(key)],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "tag" in lines[0] and column in lines[0], lines
    with Repository.open(s1, public_key=key, cache=tmp_path / "c") as replica:
        assert replica.revision == 1
    with Repository.open(s0.repo_dir, public_key=key, cache=tmp_path / "c0") as origin:
        report = check_repository(origin)
    assert [p for p in report.problems if p.startswith("history:") and column in p], report


def test_an_endless_root_catalog_is_bounded_by_the_manifests_size(
    s0: Publisher, spoiling: Callable[[str], tuple[str, list[int]]], tmp_path: Path
) -> None:
    """Before, the root catalog was bounded only by MAX_UNSIZED_OBJECT (2 GiB): a mirror
    answering it with an endless body had the replica write 2 GiB before it gave up. The
    signed manifest gives its size (B, the size inflated, as upstream writes it): the
    download now stops just past that."""
    key = s0.keys.paths.master_public
    manifest = s0.manifest()
    assert 0 < manifest.catalog_size < 2**20
    url, sent = spoiling(object_path(manifest.catalog, ObjectKind.CATALOG))
    s1 = tmp_path / "s1" / FQRN
    with pytest.raises(DownloadError, match=r"larger than \d+ bytes"):
        sync_replica(url, s1, key, max_retries=0, backoff_init=0.0)
    assert sent and all(n < SPOILED_BYTES for n in sent), sent
    assert [p.name for p in (s1 / "data" / "txn").iterdir()] == ["replica.lock"]
    assert not (s1 / ".cvmfspublished").exists()


@pytest.mark.parametrize("damage", [b"", b"garbage\n", b"C" + b"0" * 40 + b"\n"])
def test_a_damaged_manifest_in_the_replica_says_which_and_what_to_do(
    s0: Publisher, tmp_path: Path, damage: bytes
) -> None:
    """Before, a replica whose own .cvmfspublished was damaged (emptied by a disk or by hand)
    failed every sync with '.cvmfspublished: required key C is missing', which reads as the
    Stratum 0's fault, and said nothing of a way out. The line now names the replica's file
    and says what to do; removing it lets the next sync complete, reusing what was copied."""
    key = s0.keys.paths.master_public
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key)
    (s1 / ".cvmfspublished").write_bytes(damage)
    args = ["replica", "sync", str(s0.repo_dir), str(s1), "--key", str(key)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert str(s1 / ".cvmfspublished") in lines[0] and "remove it" in lines[0], lines
    (s1 / ".cvmfspublished").unlink()
    report = sync_replica(s0.repo_dir, s1, key)
    assert report.revision == 1 and report.objects_copied == 0 and report.objects_present > 0


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_damaged_reflog_in_the_replica_is_rebuilt(
    s0: Publisher, tmp_path: Path, damage: str
) -> None:
    """Before, a replica whose own .cvmfsreflog no longer opened (emptied by a disk, cut
    short) failed every sync after copying everything, just before the new manifest, with an
    error naming a temporary file: it stayed at its old revision for good. The reflog is now
    rebuilt from the catalog and history chains the replica holds (as ``repo check
    --repair-reflog`` does for a Stratum 0), with one line saying so, and the sync completes."""
    from cvmfs_ml.cvmfs.reflog import Reflog, RefType

    key = s0.keys.paths.master_public
    s1 = tmp_path / "s1" / FQRN
    sync_replica(s0.repo_dir, s1, key)
    first_root = s0.manifest().catalog
    with s0.transaction() as txn:
        txn.add_bytes("/a.txt", b"two\n")
        txn.commit()
    reflog = s1 / ".cvmfsreflog"
    good = reflog.read_bytes()
    reflog.write_bytes({"empty": b"", "garbage": b"garbage" * 100,
                        "truncated": good[: len(good) // 2]}[damage])  # fmt: skip
    args = ["replica", "sync", str(s0.repo_dir), str(s1), "--key", str(key)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "rebuilt" in lines[0] and str(reflog) in lines[0], lines
    with Repository.open(s1, public_key=key, cache=tmp_path / "c") as replica:
        assert replica.revision == 2 and replica.read_bytes("/a.txt") == b"two\n"
    manifest = s0.manifest()
    with Reflog.open(reflog) as rebuilt:  # both revisions' roots, and the rest the manifest names
        assert rebuilt.contains(manifest.catalog, RefType.CATALOG)
        assert rebuilt.contains(first_root, RefType.CATALOG)
        assert manifest.history is not None and rebuilt.contains(manifest.history)
        assert manifest.certificate is not None and rebuilt.contains(manifest.certificate)


def test_a_tag_published_past_year_9999_is_listed(s0: Publisher, tmp_path: Path) -> None:
    """Before, one tag whose timestamp lay past what a date holds (year 9999) made ``repo
    tags`` print part of the list and then 'Value too large for defined data type'; the tag
    is now listed with its raw time, and the others with theirs."""
    publish_spoiled(
        s0, tmp_path, ObjectKind.HISTORY, "UPDATE tags SET timestamp = ? WHERE name = 'v1'",
        (2**62,),
    )  # fmt: skip
    args = ["repo", "tags", str(s0.repo_dir), "--key", str(s0.keys.paths.master_public)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert f"T={2**62}" in lines["v1"] and "T=" not in lines["trunk"], lines
