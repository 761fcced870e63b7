"""What the HTTP layer calls: accept an upload, answer ``exists``/``update``, report jobs.

A :class:`RegistryService` owns the queue database, one :class:`RepositoryWorker` per
repository and the metrics. It speaks in plain values and raises
:class:`~cvmfs_ml.registry.tarballs.RejectedError` for what the client got wrong, so the same
service backs the user-pub endpoints, the JSON API and tests.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.errors import ConfigError, CvmfsMlError, LockedError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.registry.cid import ContentId
from cvmfs_ml.registry.config import ConfigFile, RegistryConfig
from cvmfs_ml.registry.jobs import Job, JobStore, QueueFullError
from cvmfs_ml.registry.metrics import RegistryMetrics
from cvmfs_ml.registry.oci_store import OciError
from cvmfs_ml.registry.tarballs import RejectedError, check_tarball
from cvmfs_ml.registry.worker import CleanupReport, RepositoryWorker, check_poll_seconds

if TYPE_CHECKING:
    from cvmfs_ml.registry.oci_store import OciStore

__all__ = ["Accepted", "RegistryService", "Upload", "UploadFile"]

log = logging.getLogger("cvmfs_ml.registry")
BUSY_RETRY_AFTER = 5
"""Seconds a client refused for ``max_receiving_uploads`` is told to wait (oras honours it)."""


@dataclass(frozen=True)
class Accepted:
    """The answer to a publish: the job (new or the one already active), or where it is."""

    job: Job | None
    present: str | None  # the CID's /cvmfs path when it is already published


class Upload(Protocol):
    """A body on disk in the spool folder, ready to be queued."""

    path: Path
    size: int

    def finish(self) -> str: ...  # durable on disk; returns the SHA-256 hex

    def discard(self) -> None: ...


class UploadFile:
    """A request body being written to the spool folder, hashed and bounded as it arrives."""

    def __init__(self, spool: Path, limit: int) -> None:
        self.path = spool / f"{uuid.uuid4().hex}.upload"
        spool.mkdir(parents=True, exist_ok=True)  # made again if removed under a running registry
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._handle: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in finish/discard

    def write(self, chunk: bytes) -> None:
        assert self._handle is not None
        self.size += len(chunk)
        if self.size > self.limit:
            raise RejectedError(413, f"body larger than {self.limit} bytes", "oversized")
        self._hash.update(chunk)
        self._handle.write(chunk)

    def finish(self) -> str:
        """Flush to disk (the job must survive a crash); returns the SHA-256 hex."""
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        return self._hash.hexdigest()

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.path.unlink(missing_ok=True)


def _claim(data_dir: Path) -> BinaryIO:
    """Hold ``<data>/registry.lock`` for as long as this service lives; one line when another
    registry holds it.

    Why: a second ``registry serve`` on the same folder (another port, a restart overlapping
    the old process) would take the first one's jobs being published for interrupted and
    queue them again, and delete the bodies it is receiving as orphans.
    """
    handle = open(data_dir / "registry.lock", "a+b")  # noqa: SIM115 - held until stop()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(32).decode(errors="replace").strip() or "?"
        handle.close()
        raise LockedError(
            f"another registry (pid {holder}) serves {data_dir}: stop it first, or give this "
            "one its own --data folder"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle


def _check_stratum1(folder: Path) -> None:
    """``--stratum1`` must be a folder the service can write (made when missing): else it
    started and every snapshot after a publish failed, in the log only."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        why = "not a folder" if folder.exists() and not folder.is_dir() else exc.strerror or exc
        raise ConfigError(f"--stratum1 {folder}: cannot write there ({why});"
                          " give a folder the registry may write, or leave --stratum1 out"
                          ) from exc  # fmt: skip


class RegistryService:
    def __init__(
        self,
        repositories: list[Path],
        data_dir: Path,
        config: ConfigFile,
        *,
        poll_seconds: float = 1.0,
        stratum1: Path | None = None,
    ) -> None:
        """``stratum1``: a folder to snapshot every repository into after each publish."""
        if not repositories:
            raise ConfigError("the registry needs at least one repository (--repo)")
        check_poll_seconds(poll_seconds)
        publishers = [Publisher.open(Path(folder)) for folder in repositories]  # before writing
        seen: dict[str, Path] = {}
        for folder, publisher in zip(repositories, publishers, strict=True):
            if publisher.fqrn in seen:  # one worker per FQRN: the other was silently dropped
                raise ConfigError(f"--repo {seen[publisher.fqrn]} and --repo {folder} are both"
                                  f" {publisher.fqrn}: give each repository once")  # fmt: skip
            seen[publisher.fqrn] = Path(folder)
        if stratum1 is not None:
            _check_stratum1(Path(stratum1))
        self.config_file = config
        self.data_dir = Path(data_dir)
        self.spool = self.data_dir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self._data_lock = _claim(self.data_dir)
        try:
            self.store = JobStore(self.data_dir / "queue.sqlite")
        except BaseException:
            self._data_lock.close()
            raise
        self.metrics = RegistryMetrics(self.store.queue_stats)
        self.workers: dict[str, RepositoryWorker] = {}
        for index, publisher in enumerate(publishers):
            self.workers[publisher.fqrn] = RepositoryWorker(
                publisher, self.store, config, self.metrics, poll_seconds=poll_seconds,
                stratum1=stratum1, index=index,
            )  # fmt: skip
        self.started = time.time()
        self._rate_lock = threading.Lock()
        self._recent_uploads: dict[str, collections.deque[float]] = {}
        self._receiving = 0

    @property
    def config(self) -> RegistryConfig:
        return self.config_file.current()

    @property
    def repositories(self) -> list[str]:
        return list(self.workers)

    def start(self) -> None:
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.info("requeued %d job(s) interrupted by the last shutdown", requeued)
        self._remove_orphan_uploads()
        for worker in self.workers.values():
            worker.start()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.store.close()
        self._data_lock.close()

    def _remove_orphan_uploads(self) -> None:
        """Uploads no job refers to (a body cut off mid-transfer by a crash)."""
        keep = self.store.pending_uploads()
        for path in self.spool.glob("*.upload"):
            if str(path) not in keep:
                path.unlink(missing_ok=True)

    # -- user-pub operations ------------------------------------------------------------------
    def cid_path(self, repo: str, cid: str) -> str:
        return f"/cvmfs/{repo}{ContentId(cid).repo_path(self.config.prefix)}"

    def exists(self, cid: ContentId) -> str | None:
        record = self.store.find_cid(cid.text)
        return self.cid_path(record.repo, record.cid) if record else None

    def update(self, cid: ContentId) -> str | None:
        path = self.exists(cid)
        if path is not None:
            self.store.touch(cid.text)
        return path

    def check_rate(self, who: str) -> None:
        """429 when ``who`` started ``uploads_per_minute`` uploads in the last minute."""
        limit = self.config.uploads_per_minute
        if limit <= 0:
            return
        now = time.monotonic()
        with self._rate_lock:
            recent = self._recent_uploads.setdefault(who, collections.deque())
            while recent and recent[0] < now - 60:
                recent.popleft()
            if len(recent) >= limit:
                raise RejectedError(429, f"more than {limit} uploads a minute; retry later",
                                    "rate_limited")  # fmt: skip
            recent.append(now)

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """One of at most ``max_receiving_uploads`` bodies (OCI blobs and manifests, resumable,
        user-pub) received at once; past it, 429 with a short Retry-After. oras-go retries it
        (5 times, honouring Retry-After), skopeo with ``--retry-times``; docker's push does
        not retry a TOOMANYREQUESTS and stops with the message, which says to retry.

        Why: each holds up to 12 MiB of buffers (a block gathered, two being hashed and
        written) for as long as its client sends, however slowly, and nothing bounded how many
        ran at once: N trickling PATCHes held N times that.
        """
        limit = self.config.max_receiving_uploads
        with self._rate_lock:
            if self._receiving >= limit:
                raise RejectedError(
                    429, f"{limit} upload bodies are being received already "
                    f"(max_receiving_uploads); retry in {BUSY_RETRY_AFTER} s", "busy",
                    retry_after=BUSY_RETRY_AFTER,
                )  # fmt: skip
            self._receiving += 1
            self.metrics.uploads_receiving.set(self._receiving)
        try:
            yield
        finally:
            with self._rate_lock:
                self._receiving -= 1
                self.metrics.uploads_receiving.set(self._receiving)

    def open_session(self, store: OciStore, who: str) -> str:
        """A new OCI or resumable upload session of ``who``: 429 past ``max_upload_sessions``
        (a short Retry-After: a push's own sessions close as its blobs finish)."""
        try:
            return store.start_upload(who, self.config.max_upload_sessions)
        except OciError as exc:
            raise RejectedError(exc.status, exc.message, "sessions",
                                retry_after=BUSY_RETRY_AFTER) from exc  # fmt: skip

    @contextlib.contextmanager
    def appending(self, store: OciStore, upload_id: str, declared: str | None,
                  who: str) -> Iterator[Callable[[bytes], int]]:  # fmt: skip
        """A writer into an OCI or resumable session, bounded by ``max_upload_bytes`` (413)
        and, with all sessions together, ``max_session_bytes`` (507 before writing, counted
        as ``errors_total{kind="session_bytes"}``); ``declared``: the Content-Length; ``who``
        writes (and owns the session if nobody did: one opened before owners were kept)."""
        config = self.config
        length = int(declared) if declared is not None and declared.isdigit() else None
        try:
            with store.appending(upload_id, config.max_upload_bytes, declared=length,
                                 budget=config.max_session_bytes, owner=who) as write:  # fmt: skip
                yield write
        except OciError as exc:
            if exc.status != 507:
                raise
            raise RejectedError(507, exc.message, "session_bytes") from exc

    def check_queue_room(self, size: int) -> None:
        """507 unless ``size`` more bytes of accepted bodies (waiting in the spool to be
        published) fit in ``max_queued_bytes``: any number were taken, from any token, so a
        slow or stuck publisher let the queue fill the disk."""
        held = self.store.pending_bytes()
        if held + size > self.config.max_queued_bytes:
            raise self._queue_full(held, size)

    def _queue_full(self, held: int, size: int) -> RejectedError:
        limit = self.config.max_queued_bytes
        return RejectedError(507, f"uploads waiting to be published hold {held} bytes, and "
                             f"{size} more would pass max_queued_bytes={limit}: try later",
                             "queued_bytes")  # fmt: skip

    def new_upload(self) -> UploadFile:
        return UploadFile(self.spool, self.config.max_upload_bytes)

    def accept(self, cid: ContentId, upload: Upload, strip: int, publisher: str) -> Accepted:
        """Queue a finished upload (the caller has written the body), or explain why not.

        Takes ownership of ``upload``: it is removed unless a new job now refers to it.
        """
        keep = False
        try:
            sha256 = upload.finish()
            expected = cid.expected_sha256
            if expected is not None and expected != sha256:
                raise RejectedError(
                    400, f"body has sha256:{sha256}, not the cid's {expected}", "digest"
                )
            present = self.update(cid)
            if present is not None:
                return Accepted(None, present)
            active = self.store.active_job(cid.text)
            if active is not None:
                return Accepted(active, None)
            config = self.config
            self.check_queue_room(upload.size)  # before reading it through; and as it is queued
            check_tarball(
                upload.path,
                strip,
                max_members=config.max_tar_members,
                max_catalogs=config.max_tar_catalogs,
                max_unpacked_bytes=config.max_unpacked_bytes,
            )
            try:
                job, created = self.store.enqueue(
                    cid.text, self._route(), strip, str(upload.path), upload.size, sha256,
                    publisher, config.max_queued_bytes,
                )  # fmt: skip
            except QueueFullError as exc:
                raise self._queue_full(exc.held, upload.size) from exc
            if created:
                keep = True
                self.metrics.bytes_ingested.inc(upload.size)
                self.workers[job.repo].wake()
                log.info("queued %s (%d bytes) for %s as job %s",
                         cid, upload.size, job.repo, job.id)  # fmt: skip
            return Accepted(job, None)
        finally:
            if not keep:
                upload.discard()

    def _route(self) -> str:
        """New CIDs go to a repository that is not being cleaned, the least busy first."""
        stats = self.store.queue_stats()
        candidates = [w for w in self.workers.values() if not w.cleaning] or list(
            self.workers.values()
        )
        return min(candidates, key=lambda w: stats.get(w.fqrn, (0, None))[0]).fqrn

    # -- JSON API helpers ---------------------------------------------------------------------
    def job(self, job_id: str) -> Job | None:
        return self.store.job(job_id)

    def status(self, cid: ContentId) -> dict[str, object]:
        path = self.exists(cid)
        job = self.store.latest_job(cid.text)
        state = "published" if path else (job.state if job else "missing")
        record = self.store.find_cid(cid.text)
        return {
            "cid": cid.text,
            "state": state,
            "path": path,
            "repository": record.repo if record else (job.repo if job else None),
            "revision": record.revision if record else (job.revision if job else None),
            "last_used": record.last_used if record else None,
            "job": job.to_json() if job else None,
        }

    def revision(self, repo: str) -> int:
        return self.workers[repo].publisher.manifest().revision

    def stratum1_revision(self, repo: str) -> int | None:
        folder = self.workers[repo].stratum1
        if folder is None:
            return None
        try:
            return Manifest.parse((folder / ".cvmfspublished").read_bytes()).revision
        except (OSError, CvmfsMlError):
            return None

    def cleanup(self, repo: str, max_days: float | None = None) -> CleanupReport:
        days = self.config.max_days if max_days is None else max_days
        return self.workers[repo].request_cleanup(days)
