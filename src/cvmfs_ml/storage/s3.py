"""A Stratum 0 in an S3 bucket, configured in upstream's words (``CVMFS_S3_*``).

``s3://BUCKET[/PREFIX]/FQRN`` names the repository; its files are the keys ``[PREFIX/]FQRN/...``
with the layout of a local Stratum 0 (``.cvmfspublished``, ``data/xx/...``), written
``public-read`` (``CVMFS_S3_X_AMZ_ACL``), so clients and upstream ``cvmfs2`` read it straight from
the bucket's plain HTTP URL (:meth:`S3Config.public_url`). What a publisher keeps locally (the
lock, catalogs being edited) lives in a spool folder, as upstream keeps ``/var/spool/cvmfs``.
The location and the ``CVMFS_S3_*`` settings are read in :mod:`.s3_config`.

The library is boto3/botocore: it is maintained by AWS on a weekly release cadence, already a
dependency of the ecosystem we run beside (MLflow, KServe's storage initializer), and gives us
thread-safe clients with pooled connections, ``standard``-mode retries with exponential backoff
and jitter, conditional writes (``If-Match`` / ``If-None-Match``) and s3transfer's parallel
multipart uploads. obstore (Rust) has less per-request overhead, but our objects are chunks of
megabytes, so the request rate is low and the publish rate is bound by hashing and compression
(benchmarks/bench_s3.py); it would add a young compiled dependency for no measured gain.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, hash_bytes
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path, stored_bound
from cvmfs_ml.errors import ConfigError, FormatError, NotFoundError, PublishError, StorageError
from cvmfs_ml.storage.base import copy_verified, decode_verified
from cvmfs_ml.storage.s3_config import S3Config, parse_s3_location
from cvmfs_ml.storage.s3_guard import (
    STREAM_ERRORS,
    checked_pages,
    read_body,
    refuse_redirects,
    whole_read_limit,
)

__all__ = ["S3ObjectWriter", "S3Store"]

_READ_BLOCK = 4 * 2**20
_SPOOL_IN_MEMORY = 64 * 2**20  # an object_writer() object larger than this spills to the spool
_STALE_UPLOAD = dt.timedelta(hours=1)  # multipart uploads older than this were abandoned


class S3ObjectWriter:
    """An object written piecewise (a large unchunked file), uploaded on :meth:`commit`.

    Bytes collect in a spooled file (memory up to 64 MiB, then the spool folder), so memory
    stays bounded; the upload is multipart and parallel above the store's threshold.
    """

    def __init__(self, store: S3Store) -> None:
        self._store = store
        self._file: Any = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in commit/discard)
            max_size=_SPOOL_IN_MEMORY, dir=store.staging_dir(), prefix="obj."
        )
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self._file.write(data)

    def commit(self, rel_path: str) -> bool:
        try:
            if self._store.exists(rel_path):
                return False
            self._file.seek(0)
            self._store._upload(rel_path, self._file, self.size)
            return True
        finally:
            self.discard()

    def discard(self) -> None:
        self._file.close()


class S3Store:
    """One repository in an S3 bucket (the :class:`~cvmfs_ml.storage.base.ObjectStore` API)."""

    def __init__(self, location: str, config: S3Config) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.fqrn = parse_s3_location(location)
        if config.bucket and config.bucket != self.bucket:
            raise ConfigError(
                f"{location}: bucket {self.bucket!r} differs from CVMFS_S3_BUCKET={config.bucket!r}"
            )
        self.config = config
        self._location = f"s3://{self.bucket}/{self.prefix.rstrip('/')}"
        self.spool = config.spool_dir or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            / "cvmfs-ml"
            / "spool"
            / self.bucket
            / self.prefix.rstrip("/")
        )
        botocore_config = Config(
            region_name=config.region,
            signature_version="s3v4" if config.flavor == "awsv4" else "s3",
            s3={"addressing_style": "virtual" if config.dns_buckets else "path"},
            retries={"max_attempts": config.max_retries + 1, "mode": "standard"},
            max_pool_connections=config.max_connections,
            connect_timeout=config.timeout,
            read_timeout=config.timeout,
            proxies={"http": config.proxy, "https": config.proxy} if config.proxy else None,
            # Objects are named by their content hash, which the client verifies on every read;
            # an extra CRC per request costs CPU and is not what upstream's uploader sends.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint,
            aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key,
            config=botocore_config,
        )
        refuse_redirects(self._client)
        self._transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold,
            multipart_chunksize=config.multipart_chunk,
            max_concurrency=min(config.max_connections, 8),
            use_threads=True,
        )
        self._extra: dict[str, str] = {"ACL": config.acl} if config.acl else {}
        self.upload_workers = min(config.max_connections, 8)
        """Publisher workers for this store: each waits on a PUT as well as hashing."""
        self._known: set[str] = set()  # objects seen to exist: content-addressed, immutable
        self._known_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self._location!r} at {self.config.endpoint})"

    @property
    def location(self) -> str:
        return self._location

    @property
    def public_url(self) -> str:
        return self.config.public_url(self.bucket, self.prefix)

    def close(self) -> None:
        self._client.close()

    # -- local state ----------------------------------------------------------------------------
    def staging_dir(self) -> Path:
        txn = self.spool / "txn"
        txn.mkdir(parents=True, exist_ok=True)
        return txn

    def lock_path(self) -> Path:
        self.spool.mkdir(parents=True, exist_ok=True)
        return self.spool / "lock"

    def create_skeleton(self) -> None:
        """Nothing to create in a bucket (keys need no folders); checks that it is reachable."""
        self.staging_dir()
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except NotFoundError as exc:
            raise StorageError(
                f"no bucket {self.bucket!r} at {self.config.endpoint}: create it first"
            ) from exc

    def clean_staging(self) -> int:
        """Spool leftovers, and multipart uploads a killed publisher abandoned (over an hour).

        Called under the lock as a transaction or gc starts: objects remembered as present are
        forgotten too, since a collection elsewhere may have deleted them since.
        """
        with self._known_lock:
            self._known.clear()
        count = 0
        for leftover in self.staging_dir().iterdir():
            with contextlib.suppress(OSError):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                count += 1
        cutoff = dt.datetime.now(dt.UTC) - _STALE_UPLOAD
        answer = self._call("list_multipart_uploads", Bucket=self.bucket, Prefix=self.prefix)
        for upload in answer.get("Uploads", []):
            initiated = upload.get("Initiated")
            if not isinstance(initiated, dt.datetime) or not upload.get("UploadId"):
                continue  # an answer without them (not S3's): of unknown age, left alone
            if initiated.tzinfo is None:
                initiated = initiated.replace(tzinfo=dt.UTC)
            if initiated < cutoff:
                self._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=str(upload.get("Key", "")),
                    UploadId=upload["UploadId"],
                )
                count += 1
        return count

    # -- requests -------------------------------------------------------------------------------
    def _key(self, rel_path: str) -> str:
        rel = rel_path.lstrip("/")
        if ".." in rel.split("/"):
            raise NotFoundError(rel_path, self._location)
        return self.prefix + rel

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 request (botocore retries it); failures become :class:`StorageError`."""
        from botocore.exceptions import ClientError

        try:
            return getattr(self._client, operation)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            meta = exc.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise NotFoundError(kwargs.get("Key", self.bucket), self._location) from exc
            if code == "PreconditionFailed" or status in (409, 412):
                raise _PreconditionFailed(str(exc)) from exc
            if isinstance(status, int) and 300 <= status < 400:  # not followed: s3_guard
                where = str(meta.get("HTTPHeaders", {}).get("location", ""))[:200]
                raise StorageError(
                    f"S3 {operation} on {self._location}: redirected ({status}) to {where!r};"
                    " set CVMFS_S3_HOST and CVMFS_S3_REGION to the bucket's own endpoint"
                ) from exc
            raise StorageError(f"S3 {operation} on {self._location}: {code or status}") from exc
        except STREAM_ERRORS as exc:  # botocore's own, and what it lets through (urllib3's)
            raise StorageError(f"S3 {operation} on {self._location}: {exc}") from exc

    def _remember(self, rel_path: str) -> None:
        if rel_path.startswith("data/"):
            with self._known_lock:
                self._known.add(rel_path)

    def _upload(self, rel_path: str, fileobj: BinaryIO, size: int) -> None:
        """Upload a file object; multipart in parallel parts above the threshold."""
        from botocore.exceptions import ClientError

        key = self._key(rel_path)
        if size < self.config.multipart_threshold:
            self._call("put_object", Bucket=self.bucket, Key=key, Body=fileobj, **self._extra)
        else:
            try:
                self._client.upload_fileobj(
                    fileobj, self.bucket, key, ExtraArgs=self._extra, Config=self._transfer
                )
            except (ClientError, *STREAM_ERRORS) as exc:
                raise StorageError(f"S3 multipart upload of {key}: {exc}") from exc
        self._remember(rel_path)

    # -- writing --------------------------------------------------------------------------------
    def exists(self, rel_path: str) -> bool:
        """Peek before put: a HEAD request, remembered for content-addressed objects."""
        if rel_path in self._known:
            return True
        if rel_path.startswith("data/") and not self.config.peek_before_put:
            return False
        try:
            self._call("head_object", Bucket=self.bucket, Key=self._key(rel_path))
        except NotFoundError:
            return False
        self._remember(rel_path)
        return True

    def put_bytes(self, rel_path: str, data: bytes, *, durable: bool = False) -> None:
        """One PUT: S3 makes an object visible whole, and durable once it answers 200."""
        self.put_parts(rel_path, [data], durable=durable)

    def put_parts(
        self, rel_path: str, parts: Sequence[bytes | memoryview], *, durable: bool = False
    ) -> None:
        """Upload pieces as one object without joining them (no copy of the publisher's blocks)."""
        reader = _PartsReader(parts)
        self._upload(rel_path, io.BufferedReader(reader), reader.size)

    def put_object(self, stored: bytes, kind: ObjectKind, algorithm: Algorithm) -> Digest:
        digest = hash_bytes(stored, algorithm)
        rel = object_path(digest, kind)
        if not self.exists(rel):
            self.put_bytes(rel, stored)
        return digest

    def object_writer(self) -> S3ObjectWriter:
        return S3ObjectWriter(self)

    def put_file(self, rel_path: str, source: Path) -> None:
        """Upload a staged file (multipart above the threshold), then delete it."""
        try:
            with source.open("rb") as handle:
                self._upload(rel_path, handle, source.stat().st_size)
        finally:
            source.unlink(missing_ok=True)

    def link(self, rel_path: str, target_rel: str) -> None:
        """A bucket has no symlinks: a server-side copy (no bytes through this machine)."""
        if self.exists(rel_path):
            return
        source = {"Bucket": self.bucket, "Key": self._key(target_rel)}
        self._call(
            "copy_object", Bucket=self.bucket, Key=self._key(rel_path), CopySource=source,
            **self._extra,
        )  # fmt: skip

    def swap_bytes(self, rel_path: str, data: bytes, expected: bytes | None) -> None:
        """A conditional PUT: ``If-Match`` the ETag of the bytes read, or ``If-None-Match: *``.

        S3 evaluates the condition atomically, so of two publishers on different machines
        (whose spool locks do not meet) exactly one wins; the other gets a PublishError.
        """
        key = self._key(rel_path)
        condition: dict[str, str]
        try:
            current = self._call("get_object", Bucket=self.bucket, Key=key)
            etag = current["ETag"]
            body = read_body(current, whole_read_limit(rel_path), rel_path, self._location)
            condition = {"IfMatch": etag}
        except NotFoundError:
            body, condition = None, {"IfNoneMatch": "*"}
        lost = PublishError(
            f"{rel_path} of {self._location} changed while this transaction ran (another "
            "publisher?); nothing was published, try again"
        )
        if body != expected:
            raise lost
        try:
            self._call(
                "put_object", Bucket=self.bucket, Key=key, Body=data, **condition, **self._extra
            )
        except _PreconditionFailed as exc:
            raise lost from exc

    def flush(self) -> None:
        """Nothing to wait for: every PUT returned only once S3 had stored the object."""

    def remove(self, rel_path: str) -> bool:
        self._call("delete_object", Bucket=self.bucket, Key=self._key(rel_path))
        with self._known_lock:
            self._known.discard(rel_path)
        return True

    def remove_many(self, rel_paths: Sequence[str]) -> int:
        """``DeleteObjects`` in batches of 1000 (the S3 limit)."""
        removed = 0
        for start in range(0, len(rel_paths), 1000):
            batch = rel_paths[start : start + 1000]
            answer = self._call(
                "delete_objects",
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(r)} for r in batch], "Quiet": True},
            )
            errors = answer.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 could not delete {len(errors)} objects of {self._location} "
                    f"(first: {first.get('Key')}: {first.get('Code')})"
                )
            removed += len(batch)
            with self._known_lock:
                self._known.difference_update(batch)
        return removed

    # -- reading --------------------------------------------------------------------------------
    def get_bytes(self, rel_path: str) -> bytes:
        """The whole object, bounded (:func:`~cvmfs_ml.storage.s3_guard.whole_read_limit`)."""
        answer = self._call("get_object", Bucket=self.bucket, Key=self._key(rel_path))
        return read_body(answer, whole_read_limit(rel_path), rel_path, self._location)

    def list_sizes(self) -> Iterator[tuple[str, int]]:
        paginator = self._client.get_paginator("list_objects_v2")
        from botocore.exceptions import ClientError

        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "data/")
        try:
            for page in checked_pages(pages, self._location):
                for item in page.get("Contents", []):
                    key, size = item.get("Key"), item.get("Size")
                    if not isinstance(key, str) or not isinstance(size, int):
                        raise StorageError(
                            f"S3 listing of {self._location}: an entry with no Key or no Size"
                            f" ({str(key)[:200]!r}); is CVMFS_S3_HOST an S3 endpoint?"
                        )
                    rel = key[len(self.prefix) :]
                    parts = rel.split("/")
                    if len(parts) == 3 and len(parts[1]) == 2:
                        yield rel, size
        except (ClientError, *STREAM_ERRORS) as exc:
            raise StorageError(f"S3 listing of {self._location}: {exc}") from exc

    def list_objects(self) -> Iterator[str]:
        for rel, _size in self.list_sizes():
            yield rel

    def fetch(
        self,
        rel_path: str,
        expected: Digest | None,
        *,
        compressed: bool,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> bytes:
        """Read with credentials through the S3 API (the fetcher interface, for the server side).

        ``max_bytes`` bounds the content: a larger stored body is refused before it is read
        (by its declared length, and by what arrives: the two need not agree).
        """
        limit = whole_read_limit(rel_path)
        if max_bytes is not None:
            limit = stored_bound(max_bytes, compressed)
        answer = self._call("get_object", Bucket=self.bucket, Key=self._key(rel_path))
        stored = read_body(answer, limit, rel_path, self._location)
        return decode_verified(stored, rel_path, expected, compressed, max_bytes)

    def fetch_into(
        self,
        rel_path: str,
        expected: Digest | None,
        compressed: bool,
        fileobj: BinaryIO,
        *,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> int:
        answer = self._call("get_object", Bucket=self.bucket, Key=self._key(rel_path))
        body = answer["Body"]
        try:
            declared = int(answer.get("ContentLength") or 0)
            if max_bytes is not None and declared > stored_bound(max_bytes, compressed):
                raise FormatError(rel_path, f"{self._location} declares {declared} bytes")
            return copy_verified(
                body.iter_chunks(_READ_BLOCK), rel_path, expected, compressed, fileobj, max_bytes
            )
        except STREAM_ERRORS as exc:
            raise StorageError(f"S3 read of {rel_path} from {self._location}: {exc}") from exc
        finally:
            body.close()


class _PartsReader(io.RawIOBase):
    """A seekable read-only stream over byte pieces: botocore rewinds it to retry a request."""

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self.size = sum(len(p) for p in self._parts)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, min(self.size, base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        written, skip = 0, self._pos
        for part in self._parts:
            if skip >= len(part):
                skip -= len(part)
                continue
            take = min(len(part) - skip, len(out) - written)
            out[written : written + take] = part[skip : skip + take]
            written += take
            skip = 0
            if written == len(out):
                break
        self._pos += written
        return written


class _PreconditionFailed(StorageError):
    """A conditional write whose condition did not hold (someone else wrote first)."""
