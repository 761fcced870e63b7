"""The publish queue and the CID table, in one SQLite file that survives restarts.

A job is one accepted upload for one CID: ``queued`` -> ``publishing`` -> ``published``
(with the revision that made it visible) or ``failed`` (with the reason). At most one job per
CID is active (queued or publishing): a second identical request gets the active job back, so
concurrent publishes of one CID collapse into one. On start, jobs left ``publishing`` by a
killed server go back to ``queued``; their uploads are still on disk (removed only once the job
is finished), and the publisher's transaction left the previous revision intact.

``cids`` records where each published CID lives and when it was last used (published or
``update``d), which is what cleanup ages.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.storage import sqlitefile

__all__ = ["ACTIVE", "CidRecord", "Job", "JobStore", "QueueFullError"]


class QueueFullError(CvmfsMlError):
    """A job whose body would take the queue's bytes past the bound; ``held``: their bytes."""

    def __init__(self, held: int) -> None:
        super().__init__(f"the queue holds {held} bytes")
        self.held = held

QUEUED, PUBLISHING, PUBLISHED, FAILED = "queued", "publishing", "published", "failed"
ACTIVE = (QUEUED, PUBLISHING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    cid TEXT NOT NULL,
    repo TEXT NOT NULL,
    strip INTEGER NOT NULL DEFAULT 0,
    upload TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    publisher TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    revision INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_cid ON jobs(cid)
    WHERE state IN ('queued', 'publishing');
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(repo, state, created);
CREATE TABLE IF NOT EXISTS cids (
    cid TEXT NOT NULL,
    repo TEXT NOT NULL,
    revision INTEGER NOT NULL,
    published REAL NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (cid, repo)
);
"""


@dataclass(frozen=True)
class Job:
    id: str
    cid: str
    repo: str
    strip: int
    upload: str
    size: int
    sha256: str
    publisher: str
    state: str
    reason: str | None
    revision: int | None
    created: float
    started: float | None
    finished: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cid": self.cid,
            "repository": self.repo,
            "state": self.state,
            "reason": self.reason,
            "revision": self.revision,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


@dataclass(frozen=True)
class CidRecord:
    cid: str
    repo: str
    revision: int
    published: float
    last_used: float


class JobStore:
    """Thread-safe access to the queue database (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        lost = "the jobs waiting in it are lost; their uploads stay in the spool folder"
        with sqlitefile.damage_refused(self.path, lost):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- jobs ---------------------------------------------------------------------------------
    def requeue_interrupted(self) -> int:
        """Jobs a killed server left ``publishing`` go back to ``queued`` (on start)."""
        with self._txn() as db:
            return db.execute(
                "UPDATE jobs SET state=?, started=NULL WHERE state=?", (QUEUED, PUBLISHING)
            ).rowcount

    def active_job(self, cid: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE cid=? AND state IN (?, ?)", (cid, *ACTIVE)
            ).fetchone()
        return Job(**row) if row else None

    def enqueue(
        self, cid: str, repo: str, strip: int, upload: str, size: int, sha256: str, publisher: str,
        max_bytes: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; returns ``(job, created)``, the active job if one exists for ``cid``.
        :class:`QueueFullError` when the active jobs' bodies and this one would pass
        ``max_bytes`` (checked in the same transaction: bodies accepted at once add up)."""
        with self._txn() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE cid=? AND state IN (?, ?)", (cid, *ACTIVE)
            ).fetchone()
            if row:
                return Job(**row), False
            if max_bytes is not None:
                held = self._pending_bytes(db)
                if held + size > max_bytes:
                    raise QueueFullError(held)
            job = Job(
                uuid.uuid4().hex, cid, repo, strip, upload, size, sha256, publisher,
                QUEUED, None, None, time.time(), None, None,
            )  # fmt: skip
            db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id, job.cid, job.repo, job.strip, job.upload, job.size, job.sha256,
                    job.publisher, job.state, None, None, job.created, None, None,
                ),
            )  # fmt: skip
            return job, True

    def claim(self, repo: str, max_jobs: int, max_bytes: int) -> list[Job]:
        """Take the oldest queued jobs of ``repo`` (at least one, then up to the limits)."""
        with self._txn() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE repo=? AND state=? ORDER BY created LIMIT ?",
                (repo, QUEUED, max_jobs),
            ).fetchall()
            jobs: list[Job] = []
            total = 0
            for row in rows:
                if jobs and total + row["size"] > max_bytes:
                    break
                jobs.append(Job(**row))
                total += row["size"]
            now = time.time()
            db.executemany(
                "UPDATE jobs SET state=?, started=? WHERE id=?",
                [(PUBLISHING, now, job.id) for job in jobs],
            )
        return jobs

    def finish(self, jobs: list[Job], revision: int, when: float) -> None:
        """Mark ``jobs`` published in ``revision`` and record their CIDs (one transaction)."""
        with self._txn() as db:
            for job in jobs:
                db.execute(
                    "UPDATE jobs SET state=?, revision=?, finished=? WHERE id=?",
                    (PUBLISHED, revision, when, job.id),
                )
                db.execute(
                    "INSERT INTO cids VALUES (?,?,?,?,?) ON CONFLICT(cid, repo) DO UPDATE SET"
                    " revision=excluded.revision, published=excluded.published,"
                    " last_used=excluded.last_used",
                    (job.cid, job.repo, revision, when, when),
                )

    def fail(self, job: Job, reason: str) -> None:
        with self._txn() as db:
            db.execute(
                "UPDATE jobs SET state=?, reason=?, finished=? WHERE id=?",
                (FAILED, reason[:2000], time.time(), job.id),
            )

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(**row) if row else None

    def latest_job(self, cid: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE cid=? ORDER BY created DESC LIMIT 1", (cid,)
            ).fetchone()
        return Job(**row) if row else None

    def queue_stats(self) -> dict[str, tuple[int, float | None]]:
        """Per repository: (queued jobs, creation time of the oldest)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT repo, COUNT(*), MIN(created) FROM jobs WHERE state=? GROUP BY repo",
                (QUEUED,),
            ).fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}

    def pending_bytes(self) -> int:
        """Bytes of the bodies of jobs queued or being published (in the spool)."""
        with self._lock:
            return self._pending_bytes(self._db)

    @staticmethod
    def _pending_bytes(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT SUM(size) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()
        return int(row[0] or 0)

    def pending_uploads(self) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT upload FROM jobs WHERE state IN (?, ?)", ACTIVE
            ).fetchall()
        return {row[0] for row in rows}

    # -- published CIDs -----------------------------------------------------------------------
    def find_cid(self, cid: str) -> CidRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM cids WHERE cid=? ORDER BY last_used DESC LIMIT 1", (cid,)
            ).fetchone()
        return CidRecord(**row) if row else None

    def touch(self, cid: str, when: float | None = None) -> bool:
        with self._txn() as db:
            return (
                db.execute(
                    "UPDATE cids SET last_used=? WHERE cid=?", (when or time.time(), cid)
                ).rowcount
                > 0
            )

    def stale_cids(self, repo: str, older_than: float) -> list[CidRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM cids WHERE repo=? AND last_used < ? ORDER BY cid",
                (repo, older_than),
            ).fetchall()
        return [CidRecord(**row) for row in rows]

    def forget_cids(self, repo: str, cids: list[str]) -> None:
        with self._txn() as db:
            db.executemany("DELETE FROM cids WHERE repo=? AND cid=?", [(repo, c) for c in cids])

    def all_cids(self, limit: int = 1000) -> list[CidRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM cids ORDER BY last_used DESC LIMIT ?", (limit,)
            ).fetchall()
        return [CidRecord(**row) for row in rows]
