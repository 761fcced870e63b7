"""The signed manifest ``.cvmfspublished`` (cvmfs-format.md §2; mirrors cvmfs/manifest.cc).

The body is one ``<key char><value>\\n`` line per field. Upstream's parser skips empty lines, stops
at a line that is exactly ``--``, keeps the last value of a repeated key (``Z`` may repeat) and
ignores unknown keys [src: cvmfs/util/string.cc (ParseKeyvalMem)]. Its writer emits
``C B R D S G A`` and then ``L N X H T M Y`` when set [src: cvmfs/manifest.cc (ExportString)];
:meth:`Manifest.body` reproduces that byte for byte.

A signed manifest is ``body + b"--\\n" + hex(hash(body)) + b"\\n" + signature``. The hash is in
the manifest's algorithm (that of ``C``) and covers the body up to and including the ``\\n``
before ``--``; the signature is RSA PKCS#1 v1.5 with SHA-1 over the *hex text* of that hash,
made with the repository key and checked with the certificate ``X`` (§2.2, pitfall 2)
[src: cvmfs/crypto/signature.cc (Sign, Verify, CutLetter, VerifyLetter)].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, hash_bytes
from cvmfs_ml.cvmfs.keys import certificate_public_key
from cvmfs_ml.errors import FormatError, SignatureError, TrustError

__all__ = [
    "MAX_MANIFEST_BYTES",
    "DEFAULT_TTL",
    "EMPTY_PATH_MD5",
    "FqrnMismatchError",
    "Manifest",
    "sign_manifest",
    "split_signed",
    "verify_manifest",
]

EMPTY_PATH_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
"""``R``: the MD5 of the root path, which is always the empty string (§2.1)."""

MAX_MANIFEST_BYTES = 64 * 1024
"""``.cvmfspublished`` is a few hundred bytes plus a 256-byte signature: what a reader
accepts (client, replica, S3 store)."""
DEFAULT_TTL = 240
"""``D``: upstream's default catalog TTL in seconds (``catalog::Catalog::kDefaultTTL``)."""

_WHAT = ".cvmfspublished"
_SEPARATOR = b"\n--\n"
_MAX_UINT64 = 2**64 - 1
_MAX_UINT32 = 2**32 - 1
_KNOWN_KEYS = frozenset("CBRDSGALNXHTMYZ")


class FqrnMismatchError(TrustError):
    """Signed metadata of another repository than the one being opened.

    Upstream refuses it (``kFailNameMismatch``): a valid signature proves only who signed, and a
    key may serve several repositories, so a swapped-in manifest or whitelist must not pass.
    """

    def __init__(self, what: str, expected: str, got: str | None) -> None:
        super().__init__(f"{what} belongs to {got!r}, expected {expected!r}")
        self.what = what
        self.expected = expected
        self.got = got


@dataclass(frozen=True)
class Manifest:
    """The fields of ``.cvmfspublished``; each field's docstring names its key.

    ``unknown`` keeps ``(key, value)`` pairs of keys this version does not know, in file order,
    so a reader can inspect them; :meth:`body` drops them, as upstream's writer does, because
    old tools reject unknown keys (§2.1).
    """

    catalog: Digest
    """``C``: hash of the root catalog object (its algorithm is the repository's)."""
    catalog_size: int = 0
    """``B``: size of the *uncompressed* root catalog in bytes."""
    root_path_md5: str = EMPTY_PATH_MD5
    """``R``: must be the MD5 of the empty string or clients reject the manifest."""
    ttl: int = DEFAULT_TTL
    """``D``: catalog TTL in seconds (clients use the root catalog's ``TTL`` property instead)."""
    revision: int = 0
    """``S``: equals the root catalog's ``revision`` property."""
    garbage_collectable: bool = False
    """``G``: ``yes``/``no``."""
    alt_paths: bool = False
    """``A``: ``yes`` if ``.cvmfsalt-*`` links exist for the root catalog and certificate."""
    fqrn: str | None = None
    """``N``: the repository name; clients require it to equal the name they mount."""
    certificate: Digest | None = None
    """``X``: the certificate object."""
    history: Digest | None = None
    """``H``: the tag database object."""
    timestamp: int = 0
    """``T``: publish time, Unix seconds; written only when > 0."""
    metainfo: Digest | None = None
    """``M``: the meta-info JSON object."""
    reflog: Digest | None = None
    """``Y``: hash of the raw (uncompressed) ``.cvmfsreflog``."""
    micro_catalog: Digest | None = None
    """``L``: reserved by upstream and unused."""
    channel_tops: tuple[str, ...] = ()
    """``Z``: reserved ("channel tips"); one raw value per ``Z`` line."""
    unknown: tuple[tuple[str, str], ...] = ()
    """Keys this implementation does not know, as read; never written."""

    def __post_init__(self) -> None:
        if self.root_path_md5 != EMPTY_PATH_MD5:
            raise FormatError(
                _WHAT, f"R must be {EMPTY_PATH_MD5} (md5 of ''), got {self.root_path_md5!r}"
            )
        _check_uint("B", self.catalog_size, _MAX_UINT64)
        _check_uint("D", self.ttl, _MAX_UINT32)
        _check_uint("S", self.revision, _MAX_UINT64)
        _check_uint("T", self.timestamp, _MAX_UINT64)
        if self.fqrn is not None and (not self.fqrn or "\n" in self.fqrn):
            raise FormatError(_WHAT, f"N must be a non-empty single line, got {self.fqrn!r}")
        for top in self.channel_tops:
            if "\n" in top:
                raise FormatError(_WHAT, f"Z value {top!r} spans lines")

    @property
    def algorithm(self) -> Algorithm:
        """The repository's hash algorithm: that of the root catalog hash ``C``."""
        return self.catalog.algorithm

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Read a manifest body, signed or not: parsing stops at the ``--`` line.

        Stricter than upstream where upstream would silently mis-read: numbers must be decimal,
        hashes lowercase hex of a known length, and every body line must end in ``\\n``.
        """
        values: dict[str, str] = {}
        tops: list[str] = []
        unknown: list[tuple[str, str]] = []
        for number, raw in enumerate(_body_lines(data, _WHAT), start=1):
            if not raw:
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FormatError(_WHAT, f"line {number} is not UTF-8 text") from exc
            key, value = line[0], line[1:]
            if key == "Z":
                tops.append(value)
            elif key in _KNOWN_KEYS:
                values[key] = value
            else:
                unknown.append((key, value))
        for required in "CRDS":
            if required not in values:
                raise FormatError(_WHAT, f"required key {required} is missing")
        if values["R"] != EMPTY_PATH_MD5:
            raise FormatError(_WHAT, f"R must be {EMPTY_PATH_MD5} (md5 of ''), got {values['R']!r}")
        fqrn = values.get("N") or None
        return cls(
            catalog=_digest("C", values["C"]),
            catalog_size=_uint("B", values.get("B", "0"), _MAX_UINT64),
            root_path_md5=values["R"],
            ttl=_uint("D", values["D"], _MAX_UINT32),
            revision=_uint("S", values["S"], _MAX_UINT64),
            garbage_collectable=values.get("G") == "yes",
            alt_paths=values.get("A") == "yes",
            fqrn=fqrn,
            certificate=_optional_digest("X", values.get("X")),
            history=_optional_digest("H", values.get("H")),
            timestamp=_uint("T", values.get("T", "0"), _MAX_UINT64),
            metainfo=_optional_digest("M", values.get("M")),
            reflog=_optional_digest("Y", values.get("Y")),
            micro_catalog=_optional_digest("L", values.get("L")),
            channel_tops=tuple(tops),
            unknown=tuple(unknown),
        )

    def body(self) -> bytes:
        """The unsigned text, key order and spelling exactly as upstream's ``ExportString``."""
        lines = [
            f"C{self.catalog.hex}",
            f"B{self.catalog_size}",
            f"R{self.root_path_md5}",
            f"D{self.ttl}",
            f"S{self.revision}",
            f"G{_yes_no(self.garbage_collectable)}",
            f"A{_yes_no(self.alt_paths)}",
        ]
        if self.micro_catalog is not None:
            lines.append(f"L{self.micro_catalog.hex}")
        if self.fqrn:
            lines.append(f"N{self.fqrn}")
        if self.certificate is not None:
            lines.append(f"X{self.certificate.hex}")
        if self.history is not None:
            lines.append(f"H{self.history.hex}")
        if self.timestamp > 0:
            lines.append(f"T{self.timestamp}")
        if self.metainfo is not None:
            lines.append(f"M{self.metainfo.hex}")
        if self.reflog is not None:
            lines.append(f"Y{self.reflog.hex}")
        lines.extend(f"Z{top}" for top in self.channel_tops)
        return ("\n".join(lines) + "\n").encode("utf-8")


def split_signed(data: bytes, what: str = _WHAT) -> tuple[bytes, str, bytes]:
    """Cut a signed letter into ``(body, hash_hex, signature)`` (upstream's ``CutLetter``).

    ``body`` ends with the ``\\n`` before the first ``\\n--\\n``; ``hash_hex`` is the next line;
    ``signature`` is every byte after it (no trailing newline is stripped: it is binary).
    """
    cut = data.find(_SEPARATOR)
    if cut < 0:
        raise FormatError(what, "no '--' line: the data is unsigned or truncated")
    body = data[: cut + 1]
    rest = data[cut + len(_SEPARATOR) :]
    end = rest.find(b"\n")
    if end < 0:
        raise FormatError(what, "truncated after '--': the hash line has no newline")
    try:
        hash_hex = rest[:end].decode("ascii")
    except UnicodeDecodeError as exc:
        raise FormatError(what, "the hash line after '--' is not ASCII hex") from exc
    _digest_of_line(hash_hex, what)
    signature = rest[end + 1 :]
    if not signature:
        raise FormatError(what, "the signature after the hash line is missing (truncated)")
    return body, hash_hex, signature


def sign_manifest(
    body: bytes, repo_private_key: rsa.RSAPrivateKey, *, algorithm: Algorithm | None = None
) -> bytes:
    """Append the signature block: ``body + b"--\\n" + hex + b"\\n" + signature`` (§2.2).

    ``hex`` is the hash of ``body`` in the manifest's algorithm (``algorithm`` overrides the one
    taken from ``C``); the signature is PKCS#1 v1.5 + SHA-1 over those hex characters.
    """
    manifest = Manifest.parse(body)  # refuses bodies a client could not read
    if not body.endswith(b"\n") or b"\n--\n" in body or body.startswith(b"--\n"):
        raise FormatError(_WHAT, "a body to sign must end in a newline and hold no '--' line")
    digest = hash_bytes(body, algorithm or manifest.algorithm)
    hash_text = digest.hex.encode("ascii")
    signature = repo_private_key.sign(hash_text, padding.PKCS1v15(), hashes.SHA1())
    return body + b"--\n" + hash_text + b"\n" + signature


def verify_manifest(data: bytes, certificate_pem: bytes, *, fqrn: str | None = None) -> Manifest:
    """Check a signed manifest against the certificate and return what it says.

    Steps as upstream's ``VerifyLetter``: the printed hash must equal the hash of the body
    (algorithm from its length), then the signature must verify over the printed hex text with
    the certificate's key. With ``fqrn``, ``N`` must equal it (manifest_fetch.cc). Whether the
    certificate itself is trusted is the whitelist's business (:mod:`cvmfs_ml.cvmfs.whitelist`).
    """
    body, hash_hex, signature = split_signed(data)
    printed = _digest_of_line(hash_hex, _WHAT)
    if hash_bytes(body, printed.algorithm) != printed:
        raise SignatureError(f"{_WHAT}: the body does not hash to the signed {hash_hex}")
    public_key = certificate_public_key(certificate_pem)
    try:
        public_key.verify(signature, hash_hex.encode("ascii"), padding.PKCS1v15(), hashes.SHA1())
    except InvalidSignature as exc:
        raise SignatureError(f"{_WHAT}: signature does not verify with the certificate") from exc
    manifest = Manifest.parse(body)
    if fqrn is not None and manifest.fqrn != fqrn:
        raise FqrnMismatchError(_WHAT, fqrn, manifest.fqrn)
    return manifest


def _body_lines(data: bytes, what: str) -> list[bytes]:
    """The body's lines without their ``\\n``, up to (not including) a ``--`` line."""
    lines: list[bytes] = []
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            raise FormatError(
                what, f"truncated: the last line {data[start : start + 40]!r} has no newline"
            )
        line = data[start:end]
        if line == b"--":
            break
        lines.append(line)
        start = end + 1
    return lines


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _check_uint(key: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise FormatError(_WHAT, f"{key} must be an integer in 0..{maximum}, got {value!r}")


def _uint(key: str, text: str, maximum: int) -> int:
    """A decimal field; upstream's String2Uint64 would read garbage as 0, which we refuse."""
    if not text or not text.isascii() or not text.isdigit():
        raise FormatError(_WHAT, f"{key} must be a decimal number, got {text!r}")
    value = int(text)
    if value > maximum:
        raise FormatError(_WHAT, f"{key}={value} is larger than {maximum}")
    return value


def _digest(key: str, text: str) -> Digest:
    try:
        return Digest.from_hex(text)
    except FormatError as exc:
        raise FormatError(_WHAT, f"key {key}: {exc.reason}") from exc


def _optional_digest(key: str, text: str | None) -> Digest | None:
    return None if text is None else _digest(key, text)


def _digest_of_line(text: str, what: str) -> Digest:
    try:
        return Digest.from_hex(text)
    except FormatError as exc:
        raise FormatError(what, f"bad hash line after '--': {exc.reason}") from exc
