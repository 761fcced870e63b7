"""The I/O half of the trust chain: fetch the manifest ensemble, keep the rollback breadcrumb.

:mod:`cvmfs_ml.client.trust` decides (bytes and a clock in, a verdict out); this module fetches
what it needs within its caps (``.cvmfspublished``, ``.cvmfswhitelist``, the certificate object
kept in the cache as upstream does) and remembers the newest accepted manifest in the cache's
breadcrumb ``cvmfschecksum.<fqrn>`` (cvmfs-format.md §10.2, §10.7), so a replayed older
manifest is refused even after a restart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.trust import (
    MAX_CERTIFICATE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_WHITELIST_BYTES,
    TrustAnchors,
    Trusted,
    parse_manifest,
    refuse_rollback,
    verify_ensemble,
)
from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.errors import CvmfsMlError, FormatError

__all__ = ["Breadcrumb", "fetch_manifest", "fetch_trusted"]


def fetch_manifest(source: Any, anchors: TrustAnchors, *, nocache: bool) -> tuple[bytes, Manifest]:
    """``.cvmfspublished`` (capped) and what it says, not yet trusted: for ``verify=False``."""
    raw = source.fetch(
        ".cvmfspublished", None, compressed=False, nocache=nocache, max_bytes=MAX_MANIFEST_BYTES
    )
    return raw, parse_manifest(anchors, raw)


def fetch_trusted(
    source: Any, cache: ObjectCache, anchors: TrustAnchors, *, now: dt.datetime, nocache: bool
) -> Trusted:
    """Fetch the manifest, the whitelist and the certificate; the trust core's verdict.

    ``source`` is an :class:`~cvmfs_ml.storage.base.ObjectSource`; ``nocache`` asks
    proxies for fresh root files. The certificate comes from ``cache`` when it is there.
    """
    raw, manifest = fetch_manifest(source, anchors, nocache=nocache)
    if manifest.certificate is None:
        raise FormatError(".cvmfspublished", "no certificate (X) to verify the signature with")
    raw_whitelist = source.fetch(
        ".cvmfswhitelist", None, compressed=False, nocache=nocache, max_bytes=MAX_WHITELIST_BYTES
    )
    certificate = _stored_certificate(source, cache, manifest.certificate)
    return verify_ensemble(anchors, raw, raw_whitelist, certificate, now)


def _stored_certificate(source: Any, cache: ObjectCache, digest: Digest) -> bytes:
    """The certificate object as stored (compressed), kept in the cache like upstream does.

    The cache keeps the stored bytes, which hash to the object's name, so a copy from the cache
    is checked again here (and by the trust core) and fetched anew when it is not right.
    """
    path = cache.get_path(digest)
    if path is not None:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CERTIFICATE_BYTES + 1)
            if hash_bytes(data, digest.algorithm) == digest:
                return bytes(data)
        except OSError:
            pass  # evicted meanwhile
        cache.invalidate(digest)
    rel = object_path(digest, ObjectKind.CERTIFICATE)
    data = source.fetch(rel, digest, compressed=False, max_bytes=MAX_CERTIFICATE_BYTES)
    with contextlib.suppress(OSError, CvmfsMlError):  # a read-only cache still verifies
        cache.put_bytes(digest, data)
    return bytes(data)


class Breadcrumb:
    """``cvmfschecksum.<fqrn>`` in a cache: ``<catalog>T<time>R<rev>`` of the newest manifest
    any process using this cache has accepted. It only moves forward; a lock keeps concurrent
    processes from moving it back."""

    def __init__(self, cache_root: Path, fqrn: str) -> None:
        self.fqrn = fqrn
        self.path = Path(cache_root) / f"cvmfschecksum.{fqrn}"

    def read(self) -> tuple[str, int, int] | None:
        """``(catalog hex, timestamp, revision)``, or None (absent, unreadable)."""
        try:
            text = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        digest, _, rest = text.partition("T")
        stamp, _, revision = rest.partition("R")
        try:
            return digest, int(stamp), int(revision)
        except ValueError:
            return None  # upstream ignores a breadcrumb it cannot parse, too

    def accept(self, manifest: Manifest) -> None:
        """Refuse a manifest older than the breadcrumb's, then record this one."""
        path = self.path
        try:
            lock = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115
        except OSError:
            lock = None  # a read-only cache still reads; it only checks, never records
        with lock if lock is not None else contextlib.nullcontext():
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            known = self.read()
            current = (manifest.catalog.hex, manifest.timestamp, manifest.revision)
            if known is not None:
                _hash, known_ts, known_rev = known
                refuse_rollback(
                    self.fqrn, manifest, known_rev, known_ts,
                    f"breadcrumb {path}; delete it only if the repository was re-created on "
                    "purpose",
                )  # fmt: skip
                if known == current:
                    return
            if lock is None:
                return
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                tmp.write_text("{}T{}R{}".format(*current))
                os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
