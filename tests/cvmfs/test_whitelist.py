"""The whitelist codec and its raw-RSA signature, judged by the reference repository and openssl."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_ml.cvmfs.hashing import Algorithm, hash_bytes
from cvmfs_ml.cvmfs.keys import (
    dump_private_key,
    dump_public_key,
    generate_rsa_key,
    load_public_keys,
    make_certificate,
)
from cvmfs_ml.cvmfs.manifest import FqrnMismatchError, split_signed
from cvmfs_ml.cvmfs.whitelist import (
    Whitelist,
    certificate_fingerprint,
    make_whitelist,
    parse_fingerprint,
    rsa_raw_sign,
    rsa_raw_verify,
    sign_whitelist,
    verify_whitelist,
)
from cvmfs_ml.errors import CvmfsMlError, FormatError, SignatureError, WhitelistExpiredError

FQRN = "ref.test.local"
UTC = dt.UTC
NOW = dt.datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
REFERENCE_FINGERPRINT = "D3:7F:F1:ED:71:45:FB:55:98:8D:F2:DF:53:02:7C:C7:1B:E8:9E:38"
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def whitelist_bytes(reference_served: Path) -> bytes:
    return (reference_served / ".cvmfswhitelist").read_bytes()


@pytest.fixture(scope="module")
def master_pub(reference_repo: Path):
    return load_public_keys(reference_repo / "keys" / "ref.test.local.pub")


@pytest.fixture(scope="module")
def reference_cert(reference_repo: Path) -> bytes:
    return (reference_repo / "keys" / "ref.test.local.crt").read_bytes()


@pytest.fixture(scope="module")
def master_key():
    return generate_rsa_key()


@pytest.fixture(scope="module")
def repo_cert() -> bytes:
    return make_certificate(FQRN, generate_rsa_key(), NOW)


# --- the reference repository ------------------------------------------------------------


def test_reference_whitelist_verifies(
    whitelist_bytes: bytes, master_pub, reference_cert: bytes
) -> None:
    whitelist = verify_whitelist(whitelist_bytes, master_pub, FQRN, NOW)
    assert whitelist.created == dt.datetime(2026, 11, 21, 23, 48, 29, tzinfo=UTC)
    assert whitelist.expires == dt.datetime(2036, 11, 18, 23, 48, 29, tzinfo=UTC)
    assert whitelist.fqrn == FQRN
    assert whitelist.fingerprints == [REFERENCE_FINGERPRINT]
    assert (whitelist.pkcs7, whitelist.ca_chain) == (False, False)
    assert whitelist.accepts(reference_cert)
    assert certificate_fingerprint(reference_cert) == REFERENCE_FINGERPRINT


def test_reference_whitelist_accepts_certificate_object(
    whitelist_bytes: bytes, reference_served: Path
) -> None:
    from cvmfs_ml.cvmfs.manifest import Manifest
    from cvmfs_ml.cvmfs.objects import ObjectKind, inflate, object_path

    digest = Manifest.parse((reference_served / ".cvmfspublished").read_bytes()).certificate
    assert digest is not None
    cert = inflate((reference_served / object_path(digest, ObjectKind.CERTIFICATE)).read_bytes())
    assert Whitelist.parse(whitelist_bytes).accepts(cert)


def test_reference_body_round_trips(whitelist_bytes: bytes) -> None:
    body, hash_hex, signature = split_signed(whitelist_bytes, ".cvmfswhitelist")
    assert Whitelist.parse(whitelist_bytes).body() == body
    assert hash_hex == hashlib.sha1(body).hexdigest()
    assert len(signature) == 256


def test_reference_signature_is_raw_rsa(whitelist_bytes: bytes, master_pub) -> None:
    _, hash_hex, signature = split_signed(whitelist_bytes)
    assert rsa_raw_verify(master_pub[0], hash_hex.encode(), signature)
    assert not rsa_raw_verify(master_pub[0], hash_hex.encode()[:-1] + b"0", signature)


def test_reference_rejections(
    whitelist_bytes: bytes, master_pub, master_key, repo_cert: bytes
) -> None:
    with pytest.raises(FqrnMismatchError):
        verify_whitelist(whitelist_bytes, master_pub, "other.repo.org", NOW)
    with pytest.raises(SignatureError):
        verify_whitelist(whitelist_bytes, [master_key.public_key()], FQRN, NOW)
    # the remedy on both sides: the publisher's command, or the reader's clock
    with pytest.raises(WhitelistExpiredError, match=r"repo resign.*clock is wrong"):
        verify_whitelist(whitelist_bytes, master_pub, FQRN, dt.datetime(2037, 1, 1, tzinfo=UTC))
    assert not Whitelist.parse(whitelist_bytes).accepts(repo_cert)
    # any of several master keys may be the signer
    keys = [master_key.public_key(), *master_pub]
    assert verify_whitelist(whitelist_bytes, keys, FQRN, NOW).fqrn == FQRN


def test_reference_tampering_and_truncation(whitelist_bytes: bytes, master_pub) -> None:
    tampered = whitelist_bytes.replace(b"D3:7F", b"D3:7E")
    with pytest.raises(SignatureError, match="does not hash"):
        verify_whitelist(tampered, master_pub, FQRN, NOW)
    flipped = bytearray(whitelist_bytes)
    flipped[-3] ^= 0x40
    with pytest.raises(SignatureError):
        verify_whitelist(bytes(flipped), master_pub, FQRN, NOW)
    for cut in range(0, len(whitelist_bytes), 5):
        with pytest.raises(CvmfsMlError):
            verify_whitelist(whitelist_bytes[:cut], master_pub, FQRN, NOW)


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_recovers_reference_signature(
    whitelist_bytes: bytes, reference_repo: Path, tmp_path: Path
) -> None:
    _, hash_hex, signature = split_signed(whitelist_bytes)
    (tmp_path / "sig").write_bytes(signature)
    pub = str(reference_repo / "keys" / "ref.test.local.pub")
    recovered = subprocess.run(
        [
            OPENSSL,
            "pkeyutl",
            "-verifyrecover",
            "-pubin",
            "-inkey",
            pub,
            "-in",
            str(tmp_path / "sig"),
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert recovered == hash_hex.encode()


# --- expiry (hour granularity) --------------------------------------------------------------


def _whitelist(expires: dt.datetime, **changes) -> Whitelist:
    fields = {
        "created": expires - dt.timedelta(days=30),
        "expires": expires,
        "fqrn": FQRN,
        "fingerprints": [REFERENCE_FINGERPRINT],
    }
    fields.update(changes)
    return Whitelist(**fields)


def test_expiry_counts_whole_hours() -> None:
    whitelist = _whitelist(dt.datetime(2036, 11, 18, 23, 48, 29, tzinfo=UTC))
    assert whitelist.valid_at(dt.datetime(2036, 11, 18, 22, 59, 59, tzinfo=UTC))
    # same hour as the expiry: already expired, even before the minute
    assert not whitelist.valid_at(dt.datetime(2036, 11, 18, 23, 0, 0, tzinfo=UTC))
    assert not whitelist.valid_at(dt.datetime(2036, 11, 18, 23, 59, 0, tzinfo=UTC))
    # other time zones are converted; naive times are UTC
    cet = dt.timezone(dt.timedelta(hours=1))
    assert whitelist.valid_at(dt.datetime(2036, 11, 18, 23, 30, tzinfo=cet))
    assert not whitelist.valid_at(dt.datetime(2036, 11, 19, 0, 30, tzinfo=cet))
    assert whitelist.valid_at(dt.datetime(2036, 11, 18, 22, 30))


def test_make_whitelist_and_expiry(master_key, repo_cert: bytes) -> None:
    signed = make_whitelist(FQRN, repo_cert, master_key, NOW, dt.timedelta(days=7))
    keys = [master_key.public_key()]
    whitelist = verify_whitelist(signed, keys, FQRN, NOW + dt.timedelta(days=6, hours=23))
    assert whitelist.created == NOW and whitelist.expires == NOW + dt.timedelta(days=7)
    assert whitelist.accepts(repo_cert)
    assert whitelist.fingerprints == [certificate_fingerprint(repo_cert)]
    with pytest.raises(WhitelistExpiredError):
        verify_whitelist(signed, keys, FQRN, NOW + dt.timedelta(days=7))
    assert make_whitelist(FQRN, repo_cert, master_key, NOW).startswith(b"20261122010000\nE20261222")


# --- our own signatures -------------------------------------------------------------------


def test_sign_verify_round_trip_and_wrong_key(master_key, repo_cert: bytes) -> None:
    body = _whitelist(
        NOW + dt.timedelta(days=30), fingerprints=[certificate_fingerprint(repo_cert)]
    )
    signed = sign_whitelist(body.body(), master_key)
    assert verify_whitelist(signed, [master_key.public_key()], FQRN, NOW) == body
    assert verify_whitelist(signed, [dump_public_key(master_key.public_key())], FQRN, NOW)
    other = generate_rsa_key()
    forged = sign_whitelist(body.body(), other)
    with pytest.raises(SignatureError, match="master key"):
        verify_whitelist(forged, [master_key.public_key()], FQRN, NOW)
    with pytest.raises(SignatureError):
        verify_whitelist(signed, [], FQRN, NOW)


def test_rmd160_whitelist(master_key, repo_cert: bytes) -> None:
    signed = make_whitelist(FQRN, repo_cert, master_key, NOW, algorithm=Algorithm.RMD160)
    whitelist = verify_whitelist(signed, [master_key.public_key()], FQRN, NOW)
    assert whitelist.fingerprints[0].endswith("-RMD160")
    assert split_signed(signed)[1].endswith("-rmd160")
    assert whitelist.accepts(repo_cert)
    # resigning infers the algorithm from the fingerprint line
    resigned = sign_whitelist(whitelist.body(), master_key)
    assert split_signed(resigned)[1].endswith("-rmd160")


def test_raw_rsa_padding_checks(master_key) -> None:
    public = master_key.public_key()
    signature = rsa_raw_sign(master_key, b"abc")
    assert len(signature) == 256
    assert rsa_raw_verify(public, b"abc", signature)
    assert not rsa_raw_verify(public, b"abd", signature)
    assert not rsa_raw_verify(public, b"abc", b"")
    assert not rsa_raw_verify(public, b"abc", b"\xff" * 257)
    assert not rsa_raw_verify(public, b"abc", b"\xff" * 256)  # >= n
    with pytest.raises(FormatError, match="do not fit"):
        rsa_raw_sign(master_key, b"x" * 250)


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_agrees_on_raw_signatures(master_key, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    pub_file = tmp_path / "master.pub"
    key_file.write_bytes(dump_private_key(master_key))
    pub_file.write_bytes(dump_public_key(master_key.public_key()))
    message = hash_bytes(b"whitelist body").hex.encode()
    # ours -> openssl
    ours = str(tmp_path / "ours")
    Path(ours).write_bytes(rsa_raw_sign(master_key, message))
    recovered = subprocess.run(
        [OPENSSL, "pkeyutl", "-verifyrecover", "-pubin", "-inkey", str(pub_file), "-in", ours],
        check=True,
        capture_output=True,
    ).stdout
    assert recovered == message
    # openssl (what mkfs runs: rsautl -sign, i.e. no digest) -> ours
    (tmp_path / "msg").write_bytes(message)
    theirs = subprocess.run(
        [OPENSSL, "pkeyutl", "-sign", "-inkey", str(key_file), "-in", str(tmp_path / "msg")],
        check=True,
        capture_output=True,
    ).stdout
    assert rsa_raw_verify(master_key.public_key(), message, theirs)
    assert theirs == rsa_raw_sign(master_key, message)  # PKCS#1 v1.5 type 1 is deterministic


# --- parsing rules ---------------------------------------------------------------------------

_BODY = b"20261121234829\nE20361118234829\nNref.test.local\n" + REFERENCE_FINGERPRINT.encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "at least 3 lines"),
        (b"\x00\xff\n\n\n", "UTF-8"),
        (b"2026112123482\nE20361118234829\nNx\nAA\n", "14 digits"),
        (b"202611212348290\nE20361118234829\nNx\nAA\n", "14 digits"),
        (b"20261121234829\n20361118234829\nNx\nAA\n", "'E'"),
        (b"20261121234829\nE2036111823482\nNx\nAA\n", "14 digits"),
        (b"20261121234829\nE20361318234829\nNx\nAA\n", "valid time"),
        (b"20261121234829\nE20361118234829\nx\nAA\n", "'N'"),
        (b"20261121234829\nE20361118234829\nN\nAA\n", "'N'"),
        (b"20261121234829\nE20361118234829\nNx\nAA", "no newline"),
    ],
)
def test_malformed_whitelists(data: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        Whitelist.parse(data)


def test_flags_and_fingerprint_lines(repo_cert: bytes) -> None:
    fingerprint = certificate_fingerprint(repo_cert)
    lines = [f"{fingerprint} # comment", "garbage line", ""]
    text = b"20261121234829\nE20361118234829\nNx\nVpkcs7\nWcachain\n" + "\n".join(lines).encode()
    whitelist = Whitelist.parse(text + b"\n--\n")
    assert whitelist.pkcs7 and whitelist.ca_chain
    assert whitelist.fingerprints == lines
    assert whitelist.body() == text + b"\n"
    assert len(whitelist.fingerprint_digests()) == 1
    # Wcachain needs a CA check this layer cannot make: nothing is accepted
    assert not whitelist.accepts(repo_cert)
    plain = Whitelist(whitelist.created, whitelist.expires, "x", lines)
    assert plain.accepts(repo_cert)
    assert not plain.accepts(repo_cert, blacklist=[fingerprint.lower(), "<x 5"])


def test_parse_fingerprint_rules(repo_cert: bytes) -> None:
    raw = hashlib.sha1(b"x").digest()
    colon = ":".join(f"{b:02X}" for b in raw)
    assert parse_fingerprint(colon) == ("sha1", raw)
    assert parse_fingerprint(colon.lower() + "\tcomment") == ("sha1", raw)
    assert parse_fingerprint(colon + "#c") == ("sha1", raw)
    assert parse_fingerprint(raw.hex()) == ("sha1", raw)
    assert parse_fingerprint(colon + "-RMD160") == ("rmd160", raw)
    assert parse_fingerprint(colon + "-SHAKE128") == ("shake128", raw)
    assert parse_fingerprint("AB" * 16) == ("md5", bytes([0xAB]) * 16)
    assert parse_fingerprint("AB" * 19) is None
    assert parse_fingerprint("G" * 40) is None
    assert parse_fingerprint("") is None
    # md5 fingerprints are matched too (upstream's MkFromHexPtr accepts 32 hex digits)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(repo_cert).public_bytes(serialization.Encoding.DER)
    md5 = hashlib.md5(der).hexdigest().upper()
    assert _whitelist(NOW, fingerprints=[md5]).accepts(repo_cert)


def test_verify_refuses_pkcs7_and_empty_lists(master_key) -> None:
    keys = [master_key.public_key()]
    pkcs7 = _whitelist(NOW + dt.timedelta(days=1), pkcs7=True)
    with pytest.raises(SignatureError, match="PKCS#7"):
        verify_whitelist(sign_whitelist(pkcs7.body(), master_key), keys, FQRN, NOW)
    empty = _whitelist(NOW + dt.timedelta(days=1), fingerprints=["not a fingerprint"])
    with pytest.raises(FormatError, match="no valid certificate fingerprint"):
        verify_whitelist(sign_whitelist(empty.body(), master_key), keys, FQRN, NOW)


def test_constructor_refuses_unwritable_values() -> None:
    with pytest.raises(FormatError):
        _whitelist(NOW, fqrn="")
    with pytest.raises(FormatError):
        _whitelist(NOW, fingerprints=["--"])
    with pytest.raises(FormatError):
        _whitelist(NOW, fingerprints=["Vpkcs7"])
    with pytest.raises(FormatError):
        _whitelist(NOW, fingerprints=["a\nb"])


# --- properties ----------------------------------------------------------------------------

_times = st.datetimes(
    min_value=dt.datetime(1000, 1, 1), max_value=dt.datetime(9999, 12, 31), timezones=st.just(UTC)
)
_fingerprint_lines = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=60
).filter(lambda line: line not in ("--", "Vpkcs7", "Wcachain"))
_whitelists = st.builds(
    Whitelist,
    created=_times,
    expires=_times,
    fqrn=st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,40}", fullmatch=True),
    fingerprints=st.lists(_fingerprint_lines, min_size=1, max_size=4),
    pkcs7=st.booleans(),
    ca_chain=st.booleans(),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_whitelists)
def test_property_parse_of_body_is_identity(whitelist: Whitelist) -> None:
    assert Whitelist.parse(whitelist.body()) == whitelist
    assert Whitelist.parse(whitelist.body()).body() == whitelist.body()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes_raise_only_format_error(data: bytes) -> None:
    try:
        Whitelist.parse(data)
    except FormatError:
        pass
