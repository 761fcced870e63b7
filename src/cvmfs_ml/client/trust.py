"""The trust core: is a manifest ensemble the signed, current state of repository FQRN?

In the spirit of python-tuf's ``TrustedMetadataSet``: this module is fed bytes and a clock and
does no I/O; the client (:mod:`cvmfs_ml.client.repository`), ``repo check`` and the replica
(:mod:`cvmfs_ml.replica.sync`) decide where the bytes come from and what to keep. The steps are
upstream's (cvmfs-format.md §3, §10.2; manifest_fetch.cc, whitelist.cc, signature.cc):

1. ``.cvmfspublished`` parses, is not larger than :data:`MAX_MANIFEST_BYTES` and names the
   repository the caller asked for (``N``); its revision is not below a ``<fqrn N`` line of the
   blacklist;
2. ``.cvmfswhitelist`` is signed by a master key, names the same repository and has not expired;
3. the certificate ``X`` has the hash the manifest names, inflates within
   :data:`MAX_CERTIFICATE_BYTES`, is listed in the whitelist and not in the blacklist;
4. the manifest's signature verifies with the certificate's key.

The repository name always comes from the caller (the URL's last path segment, the configuration
or the folder's name), never from the bytes being verified: one master key signs many
repositories (CERN's does), so a folder holding another repository's validly signed files must
be refused. No-rollback checks against what was already accepted are :func:`refuse_rollback`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.manifest import (
    MAX_MANIFEST_BYTES,
    FqrnMismatchError,
    Manifest,
    verify_manifest,
)
from cvmfs_ml.cvmfs.objects import Decompressor
from cvmfs_ml.cvmfs.whitelist import (
    MAX_WHITELIST_BYTES,
    Whitelist,
    certificate_fingerprint,
    matching_line,
    parse_fingerprint,
    verify_whitelist,
)
from cvmfs_ml.errors import FormatError, IntegrityError, RollbackError, SignatureError

__all__ = [
    "MAX_BLACKLIST_BYTES",
    "MAX_CERTIFICATE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_WHITELIST_BYTES",
    "Blacklist",
    "BlacklistedError",
    "TrustAnchors",
    "Trusted",
    "parse_manifest",
    "refuse_rollback",
    "verify_ensemble",
]

MAX_CERTIFICATE_BYTES = 256 * 1024
"""A PEM certificate (or a short chain) as stored and as inflated; mkfs writes ~1.2 KiB."""
MAX_BLACKLIST_BYTES = 16 * 1024 * 1024
"""``/etc/cvmfs/blacklist``: a local file, but still bounded."""


class BlacklistedError(SignatureError):
    """A certificate or revision the site blacklist (``/etc/cvmfs/blacklist``) refuses."""


@dataclass(frozen=True)
class Blacklist:
    """Upstream's blacklist: certificate fingerprints and minimum revisions per repository.

    One entry per line: a fingerprint in the whitelist's format (``AB:CD:...``, optionally
    ``-RMD160``/``-SHAKE128`` and a comment) refuses that certificate for every repository; a
    line ``<fqrn N`` refuses revisions of ``fqrn`` below ``N`` [src: cvmfs/crypto/signature.cc
    (LoadBlacklist), cvmfs/whitelist.cc, cvmfs/catalog_mgr_client.cc]. Other lines (comments,
    blanks) match nothing, as upstream.
    """

    fingerprints: tuple[str, ...] = ()
    min_revisions: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, what: str = "blacklist") -> Blacklist:
        if len(data) > MAX_BLACKLIST_BYTES:
            raise FormatError(what, f"larger than {MAX_BLACKLIST_BYTES} bytes")
        fingerprints: list[str] = []
        revisions: dict[str, int] = {}
        for raw in data.splitlines():
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("<"):
                name, _, number = line[1:].strip().partition(" ")
                try:
                    revision = int(number.strip())
                except ValueError:
                    raise FormatError(what, f"bad revision line {line!r}") from None
                revisions[name] = max(revision, revisions.get(name, 0))
            elif parse_fingerprint(line) is not None:
                fingerprints.append(line)
        return cls(tuple(fingerprints), revisions)

    def __bool__(self) -> bool:
        return bool(self.fingerprints or self.min_revisions)

    def listed_fingerprint(self, certificate_pem: bytes) -> str | None:
        """The blacklist line that names this certificate, or None."""
        return matching_line(certificate_pem, self.fingerprints)

    def check_revision(self, fqrn: str, revision: int) -> None:
        minimum = self.min_revisions.get(fqrn)
        if minimum is not None and revision < minimum:
            raise BlacklistedError(
                f"{fqrn}: revision {revision} is blacklisted (the site blacklist requires at "
                f"least revision {minimum})"
            )


@dataclass(frozen=True)
class TrustAnchors:
    """What the caller trusts, from its own configuration: never from the bytes verified."""

    fqrn: str
    master_keys: Sequence[Any]
    blacklist: Blacklist = Blacklist()


@dataclass(frozen=True)
class Trusted:
    """A verified manifest ensemble."""

    manifest: Manifest
    whitelist: Whitelist
    certificate: bytes  # the PEM, inflated


def parse_manifest(anchors: TrustAnchors, raw: bytes) -> Manifest:
    """Step 1: the manifest parses, is small, names ``anchors.fqrn`` and is not blacklisted.

    Callers need it before the rest of the ensemble (it names the certificate to fetch); it is
    not trusted until :func:`verify_ensemble` returns.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(".cvmfspublished", f"larger than {MAX_MANIFEST_BYTES} bytes")
    manifest = Manifest.parse(raw)
    if manifest.fqrn != anchors.fqrn:
        raise FqrnMismatchError(".cvmfspublished", anchors.fqrn, manifest.fqrn)
    anchors.blacklist.check_revision(anchors.fqrn, manifest.revision)
    return manifest


def verify_ensemble(
    anchors: TrustAnchors,
    raw_manifest: bytes,
    raw_whitelist: bytes,
    stored_certificate: bytes,
    now: dt.datetime,
) -> Trusted:
    """Steps 1-4 over the manifest, the whitelist and the certificate object as stored.

    ``stored_certificate`` is the certificate object's bytes as served (zlib-compressed, named
    by its hash); ``now`` is the reference time for the whitelist's expiry. Each refusal has
    its own error: :class:`~cvmfs_ml.errors.FormatError` (bytes that do not parse),
    :class:`~cvmfs_ml.cvmfs.manifest.FqrnMismatchError`, :class:`SignatureError`,
    :class:`~cvmfs_ml.errors.WhitelistExpiredError`, :class:`BlacklistedError`.
    """
    manifest = parse_manifest(anchors, raw_manifest)
    if not anchors.master_keys:
        raise SignatureError(
            f"no master public key for {anchors.fqrn} to verify .cvmfswhitelist with: pass the "
            "<fqrn>.pub file (--key, CVMFS_PUBLIC_KEY or CVMFS_KEYS_DIR)"
        )
    if len(raw_whitelist) > MAX_WHITELIST_BYTES:
        raise FormatError(".cvmfswhitelist", f"larger than {MAX_WHITELIST_BYTES} bytes")
    whitelist = verify_whitelist(raw_whitelist, anchors.master_keys, anchors.fqrn, now)
    if manifest.certificate is None:
        raise FormatError(".cvmfspublished", "no certificate (X) to verify the signature with")
    certificate = _certificate(manifest.certificate, stored_certificate)
    listed = anchors.blacklist.listed_fingerprint(certificate)
    if listed is not None:
        raise BlacklistedError(
            f"{anchors.fqrn}: certificate {manifest.certificate.hex} is blacklisted "
            f"({listed.split()[0]} in the site blacklist)"
        )
    if not whitelist.accepts(certificate):
        raise SignatureError(
            f"{anchors.fqrn}: certificate {manifest.certificate.hex} (fingerprint "
            f"{certificate_fingerprint(certificate)}) is not listed in .cvmfswhitelist"
        )
    verify_manifest(raw_manifest, certificate, fqrn=anchors.fqrn)
    return Trusted(manifest, whitelist, certificate)


def refuse_rollback(
    fqrn: str, manifest: Manifest, seen_revision: int, seen_timestamp: int, seen_where: str
) -> None:
    """Refuse a manifest older (revision or publish time) than one already accepted."""
    if manifest.revision < seen_revision or manifest.timestamp < seen_timestamp:
        raise RollbackError(
            f"{fqrn}: the server offers revision {manifest.revision} (published at "
            f"T={manifest.timestamp}) but revision {seen_revision} (T={seen_timestamp}) was "
            f"already seen ({seen_where})"
        )


def _certificate(digest: Digest, stored: bytes) -> bytes:
    """The PEM inside a stored certificate object: hash-checked, inflated within the cap."""
    what = f"certificate {digest.hex}"
    if len(stored) > MAX_CERTIFICATE_BYTES:
        raise FormatError(what, f"larger than {MAX_CERTIFICATE_BYTES} bytes")
    got = hash_bytes(stored, digest.algorithm)
    if got != digest:
        raise IntegrityError(what, digest.hex, got.hex)
    return b"".join(_bounded_inflate(stored, MAX_CERTIFICATE_BYTES, what))


def _bounded_inflate(stored: bytes, limit: int, what: str) -> Iterable[bytes]:
    inflater = Decompressor(what, max_output=limit)
    yield inflater.decompress(stored)
    yield inflater.flush()
