"""The whitelist ``.cvmfswhitelist`` (cvmfs-format.md §3; mirrors cvmfs/whitelist.cc).

Layout: line 1 the creation time (``YYYYMMDDhhmmss``, 14 chars), line 2 ``E`` plus the expiry
(15 chars), line 3 ``N<fqrn>``, optional ``Vpkcs7`` and ``Wcachain`` lines, then one certificate
fingerprint per line (``AB:CD:...`` plus an optional ``-RMD160``/``-SHAKE128`` id and comment),
then ``--``, the hex hash of everything above and the signature.

The signature is **raw** RSA PKCS#1 v1.5 type 1 (``RSA_private_encrypt``, ``openssl rsautl
-sign``) over the hex hash text, with no DigestInfo (pitfall 3). It is made with the master key;
clients try every configured master public key [src: cvmfs/crypto/signature.cc (SignRsa,
VerifyRsa)]. Expiry counts whole hours: the whitelist is valid while the current UTC
``(y, m, d, h)`` is strictly before the expiry's [src: cvmfs/whitelist.cc (IsBefore)].
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, hash_bytes, new_hasher
from cvmfs_ml.cvmfs.keys import load_certificate, load_public_key
from cvmfs_ml.cvmfs.manifest import FqrnMismatchError, split_signed
from cvmfs_ml.errors import FormatError, SignatureError, WhitelistExpiredError

__all__ = [
    "MAX_WHITELIST_BYTES",
    "DEFAULT_VALIDITY",
    "Whitelist",
    "certificate_fingerprint",
    "make_whitelist",
    "matching_line",
    "parse_fingerprint",
    "rsa_raw_sign",
    "rsa_raw_verify",
    "sign_whitelist",
    "verify_whitelist",
]

MAX_WHITELIST_BYTES = 1024 * 1024
"""``.cvmfswhitelist``: a fingerprint line (~70 bytes) per certificate; room for thousands."""
DEFAULT_VALIDITY = dt.timedelta(days=30)
"""mkfs and ``resign`` sign for 30 days with a master-key file (7 with a smart card)."""

_WHAT = ".cvmfswhitelist"
_TIME_FORMAT_LENGTH = 14
_PKCS7_LINE = "Vpkcs7"
_CA_CHAIN_LINE = "Wcachain"
_MIN_PADDING = 8  # PKCS#1 v1.5 demands at least 8 padding bytes
_FINGERPRINT_STOP = (" ", "\t", "#")
_HEX = frozenset("0123456789abcdef")


@dataclass
class Whitelist:
    """The parsed whitelist. ``fingerprints`` keeps the lines exactly as in the file.

    Lines that are not valid fingerprints are kept (so :meth:`body` is byte-identical) but never
    match a certificate, which is what upstream does with them.
    """

    created: dt.datetime
    expires: dt.datetime
    fqrn: str
    fingerprints: list[str] = field(default_factory=list)
    pkcs7: bool = False
    ca_chain: bool = False

    def __post_init__(self) -> None:
        self.created = _utc_seconds(self.created)
        self.expires = _utc_seconds(self.expires)
        if not self.fqrn or any(c in self.fqrn for c in "\n\r"):
            raise FormatError(_WHAT, f"N must be a non-empty single line, got {self.fqrn!r}")
        for line in self.fingerprints:
            if "\n" in line or line == "--":
                raise FormatError(_WHAT, f"fingerprint line {line!r} would break the layout")
        first = self.fingerprints[0] if self.fingerprints else None
        if first in (_PKCS7_LINE, _CA_CHAIN_LINE):
            raise FormatError(_WHAT, f"a fingerprint line cannot be {first!r}")

    @classmethod
    def parse(cls, data: bytes) -> Whitelist:
        """Read a whitelist, signed or not (stops at ``--``); line formats are checked strictly."""
        lines = _body_lines(data)
        if len(lines) < 3:
            raise FormatError(_WHAT, f"needs at least 3 lines (created, E, N), got {len(lines)}")
        created = _parse_time(lines[0], "line 1 (creation time)")
        if not lines[1].startswith("E"):
            raise FormatError(_WHAT, f"line 2 must be 'E' + expiry, got {lines[1]!r}")
        expires = _parse_time(lines[1][1:], "line 2 (expiry)")
        if not lines[2].startswith("N") or len(lines[2]) < 2:
            raise FormatError(_WHAT, f"line 3 must be 'N' + repository name, got {lines[2]!r}")
        rest = lines[3:]
        pkcs7 = bool(rest) and rest[0] == _PKCS7_LINE
        if pkcs7:
            rest = rest[1:]
        ca_chain = bool(rest) and rest[0] == _CA_CHAIN_LINE
        if ca_chain:
            rest = rest[1:]
        return cls(created, expires, lines[2][1:], list(rest), pkcs7, ca_chain)

    def body(self) -> bytes:
        """The unsigned text, ending in ``\\n`` (the part the signature's hash covers)."""
        lines = [_format_time(self.created), "E" + _format_time(self.expires), "N" + self.fqrn]
        if self.pkcs7:
            lines.append(_PKCS7_LINE)
        if self.ca_chain:
            lines.append(_CA_CHAIN_LINE)
        lines.extend(self.fingerprints)
        return ("\n".join(lines) + "\n").encode("utf-8")

    def valid_at(self, now: dt.datetime) -> bool:
        """Upstream's hour-granular rule: ``now``'s (y, m, d, h) strictly before the expiry's."""
        current = _utc_seconds(now)
        return _hour_key(current) < _hour_key(self.expires)

    def fingerprint_digests(self) -> list[tuple[str, bytes]]:
        """``(algorithm name, raw digest)`` of every line that parses, in file order."""
        parsed = (parse_fingerprint(line) for line in self.fingerprints)
        return [item for item in parsed if item is not None]

    def accepts(self, certificate_pem: bytes, *, blacklist: Iterable[str] = ()) -> bool:
        """Whether the certificate's DER hash is listed (and not blacklisted).

        Each fingerprint is compared with the DER hash in that fingerprint's own algorithm
        [src: cvmfs/whitelist.cc (VerifyLoadedCertificate)]; blacklist lines (same format, from
        ``/etc/cvmfs/blacklist``) win. A ``Wcachain`` whitelist also demands an X.509 chain
        check against a CA store, which this pure layer cannot do, so it accepts nothing.
        """
        if matching_line(certificate_pem, blacklist) is not None:
            return False
        der = load_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
        if self.ca_chain:
            return False
        return any(_der_matches(der, name, raw) for name, raw in self.fingerprint_digests())


def parse_fingerprint(line: str) -> tuple[str, bytes] | None:
    """``(algorithm name, raw digest)`` of a fingerprint line, or ``None`` if it does not parse.

    Rules of §0.1: stop at the first space, tab or ``#``, drop ``:``, lowercase; the algorithm
    comes from the length (32 md5, 40 sha1, 47 ``-rmd160``, 49 ``-shake128``), as in upstream's
    ``MkFromFingerprint``/``MkFromHexPtr``.
    """
    for stop in _FINGERPRINT_STOP:
        line = line.split(stop, 1)[0]
    text = line.replace(":", "").lower()
    if len(text) == 32 and set(text) <= _HEX:
        return "md5", bytes.fromhex(text)
    try:
        digest = Digest.from_hex(text)
    except FormatError:
        return None
    return digest.algorithm.config_name, digest.raw


def matching_line(certificate_pem: bytes, lines: Iterable[str]) -> str | None:
    """The first fingerprint line (whitelist or blacklist format) naming this certificate."""
    der = load_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
    for line in lines:
        parsed = parse_fingerprint(line)
        if parsed is not None and _der_matches(der, *parsed):
            return line
    return None


def certificate_fingerprint(certificate_pem: bytes, algorithm: Algorithm = Algorithm.SHA1) -> str:
    """The whitelist line for a certificate (``openssl x509 -fingerprint`` style, §0.1)."""
    der = load_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
    return hash_bytes(der, algorithm).fingerprint()


def make_whitelist(
    fqrn: str,
    certificate_pem: bytes,
    master_key: rsa.RSAPrivateKey,
    now: dt.datetime,
    valid_for: dt.timedelta = DEFAULT_VALIDITY,
    *,
    algorithm: Algorithm = Algorithm.SHA1,
) -> bytes:
    """A signed whitelist listing one certificate, as ``cvmfs_server mkfs``/``resign`` write it.

    ``algorithm`` is the repository's hash algorithm: it names the fingerprint and the hash line.
    """
    created = _utc_seconds(now)
    whitelist = Whitelist(
        created=created,
        expires=created + valid_for,
        fqrn=fqrn,
        fingerprints=[certificate_fingerprint(certificate_pem, algorithm)],
    )
    return sign_whitelist(whitelist.body(), master_key, algorithm=algorithm)


def sign_whitelist(
    body: bytes, master_private_key: rsa.RSAPrivateKey, *, algorithm: Algorithm | None = None
) -> bytes:
    """``body + b"--\\n" + hex + b"\\n" + raw_rsa_signature(hex)`` (§3.1).

    Without ``algorithm`` the hash line uses the first fingerprint's algorithm (what ``resign``
    does), SHA-1 if there is none.
    """
    whitelist = Whitelist.parse(body)
    if not body.endswith(b"\n") or b"\n--\n" in body:
        raise FormatError(_WHAT, "a body to sign must end in a newline and hold no '--' line")
    if algorithm is None:
        algorithm = Algorithm.SHA1
        for name, _raw in whitelist.fingerprint_digests():
            if name != "md5":
                algorithm = Algorithm.from_name(name)
                break
    hash_text = hash_bytes(body, algorithm).hex.encode("ascii")
    return body + b"--\n" + hash_text + b"\n" + rsa_raw_sign(master_private_key, hash_text)


def verify_whitelist(
    data: bytes,
    master_public_keys: Sequence[rsa.RSAPublicKey | bytes],
    fqrn: str,
    now: dt.datetime,
) -> Whitelist:
    """Check a signed whitelist and return it; ``now`` is the reference time (UTC).

    Order: the printed hash must match the body, the raw RSA signature must verify with one of
    the master keys (:class:`SignatureError`), ``N`` must equal ``fqrn``
    (:class:`FqrnMismatchError`), the hour-granular expiry must lie ahead
    (:class:`WhitelistExpiredError`) and at least one fingerprint must parse
    (:class:`FormatError`). PKCS#7-mode whitelists are refused, as upstream does when it holds
    the whitelist in memory only (``kFailLoadPkcs7``).
    """
    body, hash_hex, signature = split_signed(data, _WHAT)
    printed = Digest.from_hex(hash_hex)
    if hash_bytes(body, printed.algorithm) != printed:
        raise SignatureError(f"{_WHAT}: the body does not hash to the signed {hash_hex}")
    keys = [
        key if isinstance(key, rsa.RSAPublicKey) else load_public_key(key, "master public key")
        for key in master_public_keys
    ]
    if not keys:
        raise SignatureError(f"{_WHAT}: no master public key to verify with")
    message = hash_hex.encode("ascii")
    if not any(rsa_raw_verify(key, message, signature) for key in keys):
        raise SignatureError(
            f"{_WHAT}: signature does not verify with any of {len(keys)} master key(s)"
        )
    whitelist = Whitelist.parse(body)
    if whitelist.fqrn != fqrn:
        raise FqrnMismatchError(_WHAT, fqrn, whitelist.fqrn)
    if not whitelist.valid_at(now):
        raise WhitelistExpiredError(
            f"{_WHAT} of {fqrn} expired at {whitelist.expires:%Y-%m-%d %H:%M} UTC "
            f"(now {_utc_seconds(now):%Y-%m-%d %H:%M} UTC): the publisher must re-sign it "
            "(`cvmfs-ml repo resign`, upstream `cvmfs_server resign`), unless this machine's "
            "clock is wrong"
        )
    if whitelist.pkcs7:
        raise SignatureError(f"{_WHAT}: PKCS#7 whitelists (Vpkcs7) are not supported")
    if not whitelist.fingerprint_digests():
        raise FormatError(_WHAT, "lists no valid certificate fingerprint")
    return whitelist


def rsa_raw_sign(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    """RSA PKCS#1 v1.5 type-1 signature of ``message`` itself, with no DigestInfo.

    This is ``RSA_private_encrypt(..., RSA_PKCS1_PADDING)``, which ``cryptography`` does not
    offer. The private operation uses CRT with random blinding (so timing does not depend on the
    message) and is checked with the public exponent before it is returned.
    """
    numbers = key.private_numbers()
    n, e = numbers.public_numbers.n, numbers.public_numbers.e
    size = (n.bit_length() + 7) // 8
    if len(message) > size - 3 - _MIN_PADDING:
        raise FormatError(
            "raw RSA signature", f"{len(message)} bytes do not fit a {size * 8}-bit key"
        )
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(message)) + b"\x00" + message
    m = int.from_bytes(block, "big")
    while True:
        blind = secrets.randbelow(n - 2) + 2
        if math.gcd(blind, n) == 1:
            break
    blinded = (m * pow(blind, e, n)) % n
    s1 = pow(blinded, numbers.dmp1, numbers.p)
    s2 = pow(blinded, numbers.dmq1, numbers.q)
    s_blinded = s2 + numbers.q * ((numbers.iqmp * (s1 - s2)) % numbers.p)
    s = (s_blinded * pow(blind, -1, n)) % n
    if pow(s, e, n) != m:  # a faulty CRT result would leak the key
        raise SignatureError("raw RSA signature failed its self-check")
    return s.to_bytes(size, "big")


def rsa_raw_verify(key: rsa.RSAPublicKey, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a raw PKCS#1 v1.5 type-1 signature of ``message`` under ``key``.

    Like upstream's ``RSA_public_decrypt`` check: recover the block, require
    ``00 01 FF..FF 00`` (at least 8 ``FF``) and compare the rest with ``message``.
    """
    numbers = key.public_numbers()
    size = (numbers.n.bit_length() + 7) // 8
    if not signature or len(signature) > size:
        return False
    s = int.from_bytes(signature, "big")
    if s >= numbers.n:
        return False
    block = pow(s, numbers.e, numbers.n).to_bytes(size, "big")
    if block[:2] != b"\x00\x01":
        return False
    end = block.find(b"\x00", 2)
    if end < 2 + _MIN_PADDING or block[2:end] != b"\xff" * (end - 2):
        return False
    return hmac.compare_digest(block[end + 1 :], message)


def _der_matches(der: bytes, algorithm_name: str, raw: bytes) -> bool:
    if algorithm_name == "md5":
        computed = hashlib.md5(der, usedforsecurity=False).digest()
    else:
        try:
            hasher = new_hasher(Algorithm.from_name(algorithm_name))
        except FormatError:  # e.g. no RIPEMD-160 in this OpenSSL: that line cannot match
            return False
        hasher.update(der)
        computed = hasher.digest()
    return hmac.compare_digest(computed, raw)


def _body_lines(data: bytes) -> list[str]:
    lines: list[str] = []
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            raise FormatError(_WHAT, "truncated: the last line has no newline")
        raw = data[start:end]
        if raw == b"--":
            break
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise FormatError(_WHAT, f"line {len(lines) + 1} is not UTF-8 text") from exc
        start = end + 1
    return lines


def _parse_time(text: str, where: str) -> dt.datetime:
    if len(text) != _TIME_FORMAT_LENGTH or not text.isascii() or not text.isdigit():
        raise FormatError(_WHAT, f"{where} must be YYYYMMDDhhmmss (14 digits), got {text!r}")
    try:
        return dt.datetime(
            int(text[0:4]),
            int(text[4:6]),
            int(text[6:8]),
            int(text[8:10]),
            int(text[10:12]),
            int(text[12:14]),
            tzinfo=dt.UTC,
        )
    except ValueError as exc:
        raise FormatError(_WHAT, f"{where}: {text!r} is not a valid time: {exc}") from exc


def _format_time(when: dt.datetime) -> str:
    return (
        f"{when.year:04d}{when.month:02d}{when.day:02d}"
        f"{when.hour:02d}{when.minute:02d}{when.second:02d}"
    )


def _utc_seconds(when: dt.datetime) -> dt.datetime:
    """Aware UTC with whole seconds (naive input is taken to be UTC, as upstream's clocks are)."""
    when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    return when.replace(microsecond=0)


def _hour_key(when: dt.datetime) -> tuple[int, int, int, int]:
    return (when.year, when.month, when.day, when.hour)
