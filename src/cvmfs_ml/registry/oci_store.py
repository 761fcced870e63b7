"""Blobs, manifests and tags pushed through the OCI distribution API, on disk.

Blobs are files named by digest (``blobs/sha256/<hex>``), written only after their digest was
checked; an upload session is a file in ``uploads/`` that grows chunk by chunk (never held in
memory) with its running hash kept beside it in memory, recomputed from the file after a
restart. Manifests are blobs too; which repository holds which blob and manifest, tags and
referrers are rows in a small SQLite database. A blob is stored once however many repositories
hold it, but each repository sees only the blobs pushed or mounted into it (as distribution's
per-repository links do): a reader of one namespace cannot fetch another's blob by digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import CvmfsMlError, FormatError, is_disk_full
from cvmfs_ml.models.sources.oci_client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from cvmfs_ml.models.sources.oci_manifest import check_index, check_manifest
from cvmfs_ml.registry.sessions import SessionLedger
from cvmfs_ml.storage import sqlitefile
from cvmfs_ml.storage.pagecache import UncachedWriter

__all__ = ["OciError", "OciStore", "StoredManifest"]

log = logging.getLogger("cvmfs_ml.registry")

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
NAME_RE = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_MANIFEST_BYTES = 4 * 2**20
SESSION_DAYS = 7
"""Days after which an upload session nobody wrote to is abandoned and its files removed."""
PRUNE_SECONDS = 3600
"""How often the running registry looks for abandoned sessions."""
PRUNE_TICK = 60.0
"""Seconds between the pruning thread's looks at the clock (a look costs one clock read)."""
_INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
_IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    repo TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL,
    artifact_type TEXT, subject TEXT, annotations TEXT, size INTEGER NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE IF NOT EXISTS tags (
    repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, tag)
);
CREATE TABLE IF NOT EXISTS blob_links (
    repo TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, digest)
);
CREATE TABLE IF NOT EXISTS publishes (
    repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT, model TEXT, revision INTEGER, PRIMARY KEY (repo, tag)
);
"""


class OciError(CvmfsMlError):
    """An error in the distribution spec's words: ``code`` (e.g. ``BLOB_UNKNOWN``) and status."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


def check_name(name: str) -> str:
    if len(name) > 255 or not NAME_RE.fullmatch(name):
        raise OciError(400, "NAME_INVALID", f"invalid repository name {name!r}")
    return name


def check_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise OciError(400, "DIGEST_INVALID", f"unsupported or malformed digest {digest!r}")
    return digest


@dataclass(frozen=True)
class StoredManifest:
    digest: str
    media_type: str
    path: Path

    def read(self) -> bytes:
        return self.path.read_bytes()


class OciStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.uploads = self.root / "uploads"
        for folder in (self.blobs, self.uploads):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._hashers: dict[str, Any] = {}
        self._busy: set[str] = set()  # sessions a request is writing or finishing
        self._db = sqlite3.connect(self.root / "oci.sqlite", check_same_thread=False,
                                   isolation_level=None)  # fmt: skip
        lost = "the tags and manifests pushed are forgotten; their blobs stay"
        with sqlitefile.damage_refused(self.root / "oci.sqlite", lost):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        self.ledger = SessionLedger(self.uploads)
        self._next_prune = 0.0
        self._pruning = threading.Lock()
        self._prune_if_due()
        self._stop_pruning = threading.Event()
        self._pruner = threading.Thread(target=self._prune_periodically, daemon=True,
                                        name="registry-prune-uploads")  # fmt: skip
        self._pruner.start()

    def _prune_periodically(self) -> None:
        """Prunes hourly whether or not sessions start: pruning only as one started, a
        registry nobody opened sessions on any more kept its abandoned ones for ever."""
        while not self._stop_pruning.wait(PRUNE_TICK):
            try:
                self._prune_if_due()
            except OSError as exc:  # a full or vanished disk: the next hour tries again
                log.warning("pruning abandoned upload sessions failed: %s", exc)

    def _prune_if_due(self) -> None:
        """Upload sessions nobody touched for ``SESSION_DAYS`` are abandoned: their files go,
        at startup and then hourly (here, and as sessions start). Only at startup, a registry
        that ran for months kept every abandoned session (and its disk) until it was
        restarted. One pass at a time: the thread's and a request's do not overlap."""
        if not self._pruning.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if now < self._next_prune:
                return
            self._next_prune = now + PRUNE_SECONDS
            self._prune()
        finally:
            self._pruning.release()

    def _prune(self) -> None:
        cutoff = time.time() - SESSION_DAYS * 86400
        try:
            found = list(self.uploads.iterdir())
        except FileNotFoundError:  # removed under the registry: made again by the next start
            return
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime >= cutoff:
                    continue
                if re.fullmatch(r"[0-9a-f]{32}", path.name):
                    with contextlib.suppress(OciError), self.claimed(path.name):
                        self.cancel_upload(path.name)  # not one a request is writing
                elif not (self.uploads / path.name.partition(".")[0]).exists():
                    path.unlink()  # a leftover of a session gone, or a stray file

    def close(self) -> None:
        self._stop_pruning.set()
        if self._pruner is not threading.current_thread():
            self._pruner.join()
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the lock. Whatever raises inside (or the
        commit itself) rolls back: a connection left inside a transaction would refuse every
        later one ("cannot start a transaction within a transaction") until a restart."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- blobs --------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).split(":", 1)[1]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def holds(self, repo: str, digest: str) -> bool:
        """Whether ``repo`` holds blob ``digest`` (pushed or mounted there, still stored)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM blob_links WHERE repo=? AND digest=?", (repo, digest)
            ).fetchone()
        return row is not None and self.has_blob(digest)

    def link(self, repo: str, digest: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO blob_links VALUES (?,?)", (repo, digest))

    def delete_blob(self, repo: str, digest: str) -> None:
        """Remove ``digest`` from ``repo``; the file goes once no repository holds it."""
        if not self.holds(repo, digest):
            raise OciError(404, "BLOB_UNKNOWN", f"blob {digest} unknown", {"digest": digest})
        with self._lock:
            self._db.execute("DELETE FROM blob_links WHERE repo=? AND digest=?", (repo, digest))
            others = self._db.execute(
                "SELECT 1 FROM blob_links WHERE digest=? LIMIT 1", (digest,)
            ).fetchone()
            if others is None:
                self.blob_path(digest).unlink(missing_ok=True)

    # -- upload sessions ----------------------------------------------------------------------
    def start_upload(self, owner: str, limit: int) -> str:
        """A new session of principal ``owner``, who may hold ``limit`` open at once (429):
        else one token could open sessions without end and fill the disk for everyone."""
        self._prune_if_due()
        upload_id = uuid.uuid4().hex
        # This folder and the blobs' are made again if removed under a running registry (a tmp
        # cleaner, an operator tidying up): else every push answers 500 until a restart.
        self.uploads.mkdir(parents=True, exist_ok=True)
        (self.uploads / upload_id).touch()  # before it counts: a recount drops sessions gone
        (self.uploads / f"{upload_id}.owner").write_text(owner)
        held = self.ledger.open(upload_id, owner, limit)
        if held is not None:
            self.cancel_upload(upload_id)
            message = (f"{held} upload sessions of {owner!r} are open (max_upload_sessions="
                       f"{limit}): finish or cancel (DELETE) some; abandoned ones go after"
                       f" {SESSION_DAYS} days")  # fmt: skip
            raise OciError(429, "TOOMANYREQUESTS", message)
        with self._lock:
            self._hashers[upload_id] = hashlib.sha256()
        return upload_id

    def _session(self, upload_id: str) -> Path:
        path = self.uploads / upload_id
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id) or not path.is_file():
            raise OciError(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload_id} unknown")
        return path

    @contextlib.contextmanager
    def claimed(self, upload_id: str) -> Iterator[None]:
        """One request at a time writes or finishes a session, else 416: two PATCHes at once
        each wrote from the offset it found into one running hash, so the file kept one's
        bytes while the hash saw both's, and a PUT with that hash stored a blob under a digest
        its bytes do not have."""
        with self._lock:
            if upload_id in self._busy:
                raise OciError(416, "BLOB_UPLOAD_INVALID", f"upload {upload_id} is receiving"
                               " another request: ask its offset once that one ends")  # fmt: skip
            self._busy.add(upload_id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(upload_id)

    def upload_size(self, upload_id: str) -> int:
        return self._session(upload_id).stat().st_size

    def _hasher(self, upload_id: str, path: Path) -> Any:
        with self._lock:
            hasher = self._hashers.get(upload_id)
        if hasher is None:  # a restart lost it: hash what is on disk
            hasher = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    hasher.update(block)
            with self._lock:
                self._hashers[upload_id] = hasher
        return hasher

    def _reserve(self, upload_id: str, size: int, budget: int | None) -> None:
        """507 unless all sessions together may hold ``budget`` bytes with this one at
        ``size``: checked before the bytes are written."""
        total = self.ledger.reserve(upload_id, size, budget)
        if total is not None:
            raise OciError(507, "DENIED", f"unfinished uploads hold {total} bytes of the "
                           f"registry's disk, and {size} here would pass max_session_bytes="
                           f"{budget}: finish or cancel uploads, or try later")  # fmt: skip

    @contextlib.contextmanager
    def appending(self, upload_id: str, limit: int, *, declared: int | None = None,
                  budget: int | None = None,
                  owner: str | None = None) -> Iterator[Callable[[bytes], int]]:  # fmt: skip
        """A writer for one request's body: ``write(chunk)`` returns the session's size.

        ``declared``: the body's length, when known, counted against ``budget`` (the bytes
        all sessions may hold, 507) before anything is written; else each piece as it comes.
        ``owner``: who writes, who now owns the session if nobody did.

        What arrived is kept when the request fails (a resumable upload goes on from there),
        except on a full disk, where the session goes back to where this request began.
        The bytes are copied into aligned buffers that other threads hash (the session's
        SHA-256) and write around the page cache (:class:`UncachedWriter`): blobs are read back
        rarely, if ever, and py-spy found a 1 GiB push's event loop busy in these writes and
        hashes for most of the push.
        """
        with self.claimed(upload_id):
            path = self._session(upload_id)
            if owner is not None:
                self.ledger.adopt(upload_id, owner)
            try:
                yield from self._appending(upload_id, path, limit, declared, budget)
            finally:
                with contextlib.suppress(FileNotFoundError):  # else finished or cancelled
                    self.ledger.settle(upload_id, path.stat().st_size)

    def _appending(self, upload_id: str, path: Path, limit: int, declared: int | None,
                   budget: int | None) -> Iterator[Callable[[bytes], int]]:  # fmt: skip
        start = path.stat().st_size
        if declared is not None and start + declared <= limit:  # else the 413 below says so
            self._reserve(upload_id, start + declared, budget)
        hasher = self._hasher(upload_id, path)
        # Two blocks of the size the API hands over (RECEIVE_BLOCK): one filling while the
        # other is hashed and written.
        writer = UncachedWriter(path, block=4 * 2**20, buffers=2, append=True, hasher=hasher)
        size = start = writer.size

        def write(chunk: bytes) -> int:
            nonlocal size
            size += len(chunk)
            if size > limit:
                raise OciError(413, "SIZE_INVALID", f"blob larger than {limit} bytes")
            self._reserve(upload_id, size, budget)  # a lookup unless past what was counted
            writer.write(chunk)
            return size

        try:
            try:
                yield write
            finally:
                try:
                    writer.close()
                except BaseException:
                    with self._lock:  # its state may not match the file: rebuilt from the file
                        self._hashers.pop(upload_id, None)
                    raise
        except (OSError, sqlite3.OperationalError) as exc:
            if is_disk_full(exc):  # kept, this request's bytes would keep the disk full
                with self._lock:
                    self._hashers.pop(upload_id, None)
                os.truncate(path, start)  # a resumable upload goes on from here once it fits
            raise

    def session_sha256(self, upload_id: str) -> tuple[Path, str]:
        """The session's file and the SHA-256 hex of what it holds so far."""
        path = self._session(upload_id)
        return path, self._hasher(upload_id, path).hexdigest()

    def finish_upload(self, upload_id: str, digest: str, repo: str | None = None) -> Path:
        """Check the session against ``digest`` and make it the blob (or 400, session kept);
        ``repo`` then holds it."""
        check_digest(digest)
        with self.claimed(upload_id):
            return self._finish_upload(upload_id, digest, repo)

    def _finish_upload(self, upload_id: str, digest: str, repo: str | None) -> Path:
        path = self._session(upload_id)
        actual = "sha256:" + self._hasher(upload_id, path).hexdigest()
        if actual != digest:
            raise OciError(400, "DIGEST_INVALID", f"upload has digest {actual}, not {digest}")
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        self.cancel_upload(upload_id)
        if repo is not None:
            self.link(repo, digest)
        return target

    def cancel_upload(self, upload_id: str) -> None:
        """Remove the session and what is kept beside it (its repository, CID, owner)."""
        with self._lock:
            self._hashers.pop(upload_id, None)
        self.ledger.forget(upload_id)
        for suffix in ("", ".repo", ".cid", ".owner"):
            (self.uploads / f"{upload_id}{suffix}").unlink(missing_ok=True)

    def bind_upload(self, upload_id: str, repo: str) -> None:
        """The session belongs to ``repo``: its URL answers only under that name."""
        (self.uploads / f"{upload_id}.repo").write_text(repo)

    def upload_of(self, repo: str, upload_id: str) -> int:
        """The size of ``repo``'s session ``upload_id``; 404 for any other session."""
        size = self.upload_size(upload_id)
        try:
            owner = (self.uploads / f"{upload_id}.repo").read_text()
        except FileNotFoundError:
            owner = None
        if owner != repo:
            raise OciError(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload_id} unknown")
        return size

    # -- manifests and tags -------------------------------------------------------------------
    def put_manifest(self, repo: str, body: bytes, media_type: str, tags: list[str]) -> str:
        """Validate and store a manifest (its blobs must be here); returns its digest."""
        try:
            document = jsontext.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise OciError(400, "MANIFEST_INVALID", f"manifest is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise OciError(400, "MANIFEST_INVALID", "manifest is not a JSON object")
        descriptors: list[Any] = []
        # Every field's type first, before anything reads one (a list where the subject's digest
        # belongs reached the database; what is stored is read back by every client).
        try:
            if "manifests" in document:  # an index
                check_index(document, "image index")
                descriptors = document["manifests"]
            else:
                if not isinstance(document.get("config"), dict):
                    raise OciError(400, "MANIFEST_INVALID", "manifest needs config and layers")
                check_manifest(document, "manifest")
                descriptors = [document["config"], *document.get("layers", [])]
        except FormatError as exc:
            raise OciError(400, "MANIFEST_INVALID", str(exc)) from exc
        declared = document.get("mediaType")
        media_type = media_type or declared or ""
        if declared and declared != media_type:
            raise OciError(400, "MANIFEST_INVALID",
                           f"Content-Type {media_type} but mediaType {declared}")  # fmt: skip
        # Served back as its Content-Type: none at all, or an index's type on an image manifest
        # (or the reverse), and no client could read it (docker-registry refuses both).
        if not media_type:
            raise OciError(400, "MANIFEST_INVALID", "no media type: send Content-Type or set"
                           " mediaType")  # fmt: skip
        shape = _INDEX_TYPES if "manifests" in document else _IMAGE_TYPES
        if media_type in (*_INDEX_TYPES, *_IMAGE_TYPES) and media_type not in shape:
            what = "an index" if "manifests" in document else "an image manifest"
            raise OciError(400, "MANIFEST_INVALID", f"{what} sent as {media_type}")
        for descriptor in descriptors:
            digest = descriptor["digest"]
            check_digest(digest)
            known = self.holds(repo, digest)
            if known and isinstance(descriptor.get("size"), int):
                known = self.blob_path(digest).stat().st_size == descriptor["size"]
            if not known:
                raise OciError(400, "MANIFEST_BLOB_UNKNOWN", f"blob {digest} unknown or of"
                               " another size", {"digest": digest})  # fmt: skip
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        target = self.blob_path(digest)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_bytes(body)
                os.replace(tmp, target)
            except BaseException:  # a full disk: the part written would stay for good
                tmp.unlink(missing_ok=True)
                raise
        subject = document.get("subject") or {}  # checked above: a descriptor, or absent
        artifact_type = document.get("artifactType") or (document.get("config") or {}).get(
            "mediaType"
        )
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?,?,?,?,?,?,?)",
                (repo, digest, media_type, artifact_type, subject.get("digest"),
                 json.dumps(document.get("annotations") or {}), len(body)),
            )  # fmt: skip
            for tag in tags:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (repo, tag, digest))
            db.execute("INSERT OR IGNORE INTO blob_links VALUES (?,?)", (repo, digest))
        return digest

    def resolve(self, repo: str, reference: str) -> StoredManifest:
        with self._lock:
            if DIGEST_RE.fullmatch(reference):
                digest = reference
            else:
                row = self._db.execute(
                    "SELECT digest FROM tags WHERE repo=? AND tag=?", (repo, reference)
                ).fetchone()
                if row is None:
                    raise OciError(404, "MANIFEST_UNKNOWN", f"{repo}:{reference} unknown")
                digest = row[0]
            row = self._db.execute(
                "SELECT media_type FROM manifests WHERE repo=? AND digest=?", (repo, digest)
            ).fetchone()
        if row is None or not self.has_blob(digest):
            raise OciError(404, "MANIFEST_UNKNOWN", f"{repo}@{reference} unknown")
        return StoredManifest(digest, row[0], self.blob_path(digest))

    def delete_manifest(self, repo: str, reference: str) -> None:
        found = self.resolve(repo, reference)
        with self._transaction() as db:
            if DIGEST_RE.fullmatch(reference):
                db.execute("DELETE FROM manifests WHERE repo=? AND digest=?",
                           (repo, found.digest))  # fmt: skip
                db.execute("DELETE FROM tags WHERE repo=? AND digest=?", (repo, found.digest))
            else:
                db.execute("DELETE FROM tags WHERE repo=? AND tag=?", (repo, reference))

    def tags(self, repo: str, last: str | None = None, limit: int = -1) -> list[str]:
        """``repo``'s tags in order, those after ``last`` only, ``limit`` at most (-1: all)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT tag FROM tags WHERE repo=? AND tag>? ORDER BY tag LIMIT ?",
                (repo, last or "", limit),
            ).fetchall()
        return [row[0] for row in rows]

    def referrers(self, repo: str, digest: str, artifact_type: str | None = None,
                  after: str | None = None, limit: int = -1) -> list[dict[str, Any]]:  # fmt: skip
        """Descriptors of ``repo``'s manifests whose subject is ``digest``, by digest: of
        ``artifact_type`` only, after ``after`` only, ``limit`` at most (-1: all)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT digest, media_type, artifact_type, annotations, size FROM manifests"
                " WHERE repo=? AND subject=? AND digest>? AND (? IS NULL OR artifact_type=?)"
                " ORDER BY digest LIMIT ?",
                (repo, digest, after or "", artifact_type, artifact_type, limit),
            ).fetchall()
        out = []
        for d, media_type, artifact_type, notes, size in rows:
            entry = {"mediaType": media_type, "digest": d, "size": size}
            if artifact_type:
                entry["artifactType"] = artifact_type
            if notes and notes != "{}":
                entry["annotations"] = json.loads(notes)
            out.append(entry)
        return out

    # -- model publishes triggered by a push --------------------------------------------------
    def set_publish(self, repo: str, tag: str, digest: str, state: str, **fields: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO publishes VALUES (?,?,?,?,?,?,?)",
                (repo, tag, digest, state, fields.get("reason"), fields.get("model"),
                 fields.get("revision")),
            )  # fmt: skip

    def publish_state(self, repo: str, tag: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT digest, state, reason, model, revision FROM publishes"
                " WHERE repo=? AND tag=?",
                (repo, tag),
            ).fetchone()
        if row is None:
            return None
        keys = ("digest", "state", "reason", "model", "revision")
        return {"repository": repo, "tag": tag, **dict(zip(keys, row, strict=True))}

    def fail_unfinished(self, reason: str) -> int:
        """Publishes still queued or publishing (a past run's: nothing resumes them) fail with
        ``reason``, so that their state does not say "queued" forever; returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE publishes SET state='failed', reason=?"
                " WHERE state IN ('queued', 'publishing')",
                (reason,),
            )
        return cursor.rowcount
