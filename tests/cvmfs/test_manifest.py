"""The manifest codec and its signature, judged by the upstream-written reference repository."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, hash_bytes
from cvmfs_ml.cvmfs.keys import generate_rsa_key, make_certificate
from cvmfs_ml.cvmfs.manifest import (
    EMPTY_PATH_MD5,
    FqrnMismatchError,
    Manifest,
    sign_manifest,
    split_signed,
    verify_manifest,
)
from cvmfs_ml.cvmfs.meta import SKELETON, default_metainfo, format_metainfo, parse_metainfo
from cvmfs_ml.cvmfs.objects import ObjectKind, deflate, inflate, object_path
from cvmfs_ml.errors import CvmfsMlError, FormatError, SignatureError, TrustError

FQRN = "ref.test.local"
NOW = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)


def _sha1(text: str) -> Digest:
    return Digest.from_hex(text)


@pytest.fixture(scope="module")
def published(reference_served: Path) -> bytes:
    return (reference_served / ".cvmfspublished").read_bytes()


@pytest.fixture(scope="module")
def reference_cert(reference_served: Path, published: bytes) -> bytes:
    """The certificate object ``X`` named by the manifest, inflated (upstream stores it zlib)."""
    digest = Manifest.parse(published).certificate
    assert digest is not None
    return inflate((reference_served / object_path(digest, ObjectKind.CERTIFICATE)).read_bytes())


@pytest.fixture(scope="module")
def repo_key():
    return generate_rsa_key()


@pytest.fixture(scope="module")
def repo_cert(repo_key) -> bytes:
    return make_certificate(FQRN, repo_key, NOW)


def _manifest(**changes) -> Manifest:
    fields = {
        "catalog": hash_bytes(b"root catalog"),
        "catalog_size": 57344,
        "revision": 7,
        "fqrn": FQRN,
        "certificate": hash_bytes(b"certificate"),
        "history": hash_bytes(b"history"),
        "timestamp": 1795304909,
    }
    fields.update(changes)
    return Manifest(**fields)


# --- the reference repository ------------------------------------------------------------


def test_reference_manifest_fields(published: bytes) -> None:
    manifest = Manifest.parse(published)
    assert manifest.catalog == _sha1("f423a05b8928434eebf9698fb5b8a15211eb724a")
    assert manifest.catalog_size == 57344
    assert manifest.root_path_md5 == "d41d8cd98f00b204e9800998ecf8427e"
    assert (manifest.ttl, manifest.revision) == (240, 3)
    assert (manifest.garbage_collectable, manifest.alt_paths) == (False, False)
    assert manifest.fqrn == FQRN
    assert manifest.certificate == _sha1("0bd61bfd22d57d7111b954b25923529ef31be303")
    assert manifest.history == _sha1("38fc79918ac69e44204bfb8b8f86279326bfbc6c")
    assert manifest.timestamp == 1795304909
    assert manifest.metainfo == _sha1("85e4f386da0d5d77c7f66cf2f58e10951f24b653")
    assert manifest.reflog is not None
    assert manifest.micro_catalog is None
    assert manifest.channel_tops == () and manifest.unknown == ()
    assert manifest.algorithm is Algorithm.SHA1


def test_reference_body_round_trips_byte_identically(published: bytes) -> None:
    body, hash_hex, signature = split_signed(published)
    assert Manifest.parse(published).body() == body
    assert Manifest.parse(body).body() == body
    assert hash_hex == hashlib.sha1(body).hexdigest()
    assert len(signature) == 256  # RSA 2048
    assert body + b"--\n" + hash_hex.encode() + b"\n" + signature == published


def test_reference_signature_verifies_with_certificate_object(
    published: bytes, reference_cert: bytes
) -> None:
    manifest = verify_manifest(published, reference_cert, fqrn=FQRN)
    assert manifest == Manifest.parse(published)


def test_reference_signature_verifies_with_crt_file(
    published: bytes, reference_repo: Path, reference_cert: bytes
) -> None:
    crt = (reference_repo / "keys" / "ref.test.local.crt").read_bytes()
    assert crt == reference_cert
    assert verify_manifest(published, crt).revision == 3


def test_reference_certificate_object_name_is_hash_of_zlib(
    reference_served: Path, published: bytes, reference_cert: bytes
) -> None:
    # X is the hash of the compressed PEM, and zlib level 6 reproduces upstream's bytes.
    assert hash_bytes(deflate(reference_cert)) == Manifest.parse(published).certificate


def test_reference_metainfo_is_the_mkfs_skeleton(reference_served: Path, published: bytes) -> None:
    digest = Manifest.parse(published).metainfo
    assert digest is not None
    stored = (reference_served / object_path(digest, ObjectKind.METAINFO)).read_bytes()
    assert inflate(stored) == SKELETON
    assert hash_bytes(deflate(SKELETON)) == digest
    assert parse_metainfo(SKELETON, strict=True)["administrator"] == "Your Name"


def test_reference_rejects_other_fqrn_and_wrong_certificate(
    published: bytes, reference_cert: bytes, repo_cert: bytes
) -> None:
    with pytest.raises(FqrnMismatchError) as info:
        verify_manifest(published, reference_cert, fqrn="other.repo.org")
    assert info.value.got == FQRN and isinstance(info.value, TrustError)
    with pytest.raises(SignatureError):
        verify_manifest(published, repo_cert)


def test_reference_tampered_byte_is_rejected(published: bytes, reference_cert: bytes) -> None:
    body_len = published.index(b"\n--\n") + 1
    # a body byte (the revision digit), a hash-line byte and a signature byte
    positions = [published.index(b"\nS3\n") + 2, body_len + 3 + 5, len(published) - 10]
    for position in positions:
        tampered = bytearray(published)
        tampered[position] ^= 0x01
        with pytest.raises((SignatureError, FormatError)):
            verify_manifest(bytes(tampered), reference_cert)
    tampered = bytearray(published)
    tampered[positions[0]] = ord("4")
    with pytest.raises(SignatureError, match="does not hash"):
        verify_manifest(bytes(tampered), reference_cert)


def test_reference_truncations_raise_only_our_errors(
    published: bytes, reference_cert: bytes
) -> None:
    body_len = published.index(b"\n--\n") + 1
    for cut in range(0, len(published), 7):
        with pytest.raises(CvmfsMlError):
            verify_manifest(published[:cut], reference_cert)
    with pytest.raises(FormatError, match="no '--'"):
        verify_manifest(published[: body_len - 5], reference_cert)
    with pytest.raises(SignatureError):
        verify_manifest(published[:-1], reference_cert)


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00\xff\xfe", b"--\n", b"hello world\n", b"\x89PNG\r\n\x1a\n" * 10]
)
def test_garbage_raises_format_error(garbage: bytes, reference_cert: bytes) -> None:
    with pytest.raises(FormatError):
        Manifest.parse(garbage)
    with pytest.raises(FormatError):
        verify_manifest(garbage, reference_cert)


# --- parsing rules ---------------------------------------------------------------------------

GOOD = (
    b"Cf423a05b8928434eebf9698fb5b8a15211eb724a\n"
    b"B57344\n"
    b"Rd41d8cd98f00b204e9800998ecf8427e\n"
    b"D240\n"
    b"S3\n"
    b"Gno\n"
    b"Ano\n"
    b"Nref.test.local\n"
)


@pytest.mark.parametrize("key", [b"C", b"R", b"D", b"S"])
def test_missing_required_key(key: bytes) -> None:
    body = b"".join(line + b"\n" for line in GOOD.splitlines() if not line.startswith(key))
    with pytest.raises(FormatError, match=f"required key {key.decode()}"):
        Manifest.parse(body)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"CF423A05B8928434EEBF9698FB5B8A15211EB724A", "lowercase"),
        (b"Cf423a05b8928434eebf9698fb5b8a15211eb724", "key C"),
        (b"Xnot-a-hash", "key X"),
        (b"Rd41d8cd98f00b204e9800998ecf8427f", "md5 of ''"),
        (b"S3a", "decimal"),
        (b"S-1", "decimal"),
        (b"S+3", "decimal"),
        (b"S", "decimal"),
        (b"D99999999999", "larger than"),
        (b"T1.5", "decimal"),
        (b"N\xff\xfe", "UTF-8"),
    ],
)
def test_bad_values(line: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        Manifest.parse(GOOD + line + b"\n")


def test_unterminated_last_line_is_truncation() -> None:
    with pytest.raises(FormatError, match="no newline"):
        Manifest.parse(GOOD + b"T17953")


def test_upstream_parser_rules() -> None:
    text = (
        GOOD
        + b"\n"  # empty lines are skipped
        + b"S4\n"  # the last value of a repeated key wins
        + b"Z10abc\nZ20def\n"  # Z may repeat
        + b"V2.12.0\nQ\n"  # unknown keys are kept for reading, never written
        + b"--\nthis part is not parsed\n"
    )
    manifest = Manifest.parse(text)
    assert manifest.revision == 4
    assert manifest.channel_tops == ("10abc", "20def")
    assert manifest.unknown == (("V", "2.12.0"), ("Q", ""))
    body = manifest.body()
    assert b"V2.12.0" not in body and body.endswith(b"Z10abc\nZ20def\n")
    assert Manifest.parse(GOOD + b"Gyes\nAyes\n").garbage_collectable is True
    assert Manifest.parse(GOOD + b"Gmaybe\n").garbage_collectable is False  # as upstream
    assert Manifest.parse(GOOD + b"N\n").fqrn is None


def test_body_key_order_and_optional_keys() -> None:
    manifest = _manifest(
        micro_catalog=hash_bytes(b"L"),
        metainfo=hash_bytes(b"M"),
        reflog=hash_bytes(b"Y"),
        channel_tops=("00" + hash_bytes(b"Z").hex,),
        garbage_collectable=True,
    )
    keys = [line[:1] for line in manifest.body().decode().splitlines()]
    assert keys == list("CBRDSGALNXHTMYZ")
    bare = Manifest(catalog=hash_bytes(b"root"))
    assert bare.body().decode().splitlines() == [
        f"C{hash_bytes(b'root').hex}",
        "B0",
        f"R{EMPTY_PATH_MD5}",
        "D240",
        "S0",
        "Gno",
        "Ano",
    ]


def test_constructor_refuses_unwritable_values() -> None:
    with pytest.raises(FormatError):
        _manifest(revision=-1)
    with pytest.raises(FormatError):
        _manifest(fqrn="two\nlines")
    with pytest.raises(FormatError):
        _manifest(fqrn="")
    with pytest.raises(FormatError):
        _manifest(root_path_md5="0" * 32)
    with pytest.raises(FormatError):
        _manifest(ttl=2**32)


# --- our own signatures -------------------------------------------------------------------


def test_sign_verify_round_trip(repo_key, repo_cert: bytes) -> None:
    manifest = _manifest()
    signed = sign_manifest(manifest.body(), repo_key)
    body, hash_hex, _signature = split_signed(signed)
    assert body == manifest.body()
    assert hash_hex == hashlib.sha1(body).hexdigest()
    assert verify_manifest(signed, repo_cert, fqrn=FQRN) == manifest
    with pytest.raises(FqrnMismatchError):
        verify_manifest(signed, repo_cert, fqrn="another.repo")


def test_sign_uses_repository_algorithm(repo_key, repo_cert: bytes) -> None:
    catalog = hash_bytes(b"root", Algorithm.SHAKE128)
    manifest = _manifest(catalog=catalog, certificate=None, history=None)
    signed = sign_manifest(manifest.body(), repo_key)
    _, hash_hex, _ = split_signed(signed)
    assert hash_hex.endswith("-shake128") and len(hash_hex) == 49
    assert verify_manifest(signed, repo_cert) == manifest


def test_sign_refuses_bodies_clients_cannot_read(repo_key) -> None:
    with pytest.raises(FormatError):
        sign_manifest(b"Sgarbage\n", repo_key)
    with pytest.raises(FormatError):
        sign_manifest(GOOD + b"--\nextra\n", repo_key)


def test_own_manifest_with_tampering(repo_key, repo_cert: bytes) -> None:
    signed = sign_manifest(_manifest().body(), repo_key)
    tampered = signed.replace(b"\nS7\n", b"\nS8\n")
    with pytest.raises(SignatureError):
        verify_manifest(tampered, repo_cert)
    # a consistent hash line but a signature from another key
    other = generate_rsa_key()
    resigned = sign_manifest(_manifest(revision=8).body(), other)
    with pytest.raises(SignatureError, match="signature"):
        verify_manifest(resigned, repo_cert)


# --- properties ----------------------------------------------------------------------------

_digests = st.builds(
    Digest,
    st.sampled_from(list(Algorithm)),
    st.binary(min_size=20, max_size=20),
)
_uint64 = st.integers(min_value=0, max_value=2**64 - 1)
_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30
)
_manifests = st.builds(
    Manifest,
    catalog=_digests,
    catalog_size=_uint64,
    ttl=st.integers(min_value=0, max_value=2**32 - 1),
    revision=_uint64,
    garbage_collectable=st.booleans(),
    alt_paths=st.booleans(),
    fqrn=st.none() | _line.filter(bool),
    certificate=st.none() | _digests,
    history=st.none() | _digests,
    timestamp=_uint64,
    metainfo=st.none() | _digests,
    reflog=st.none() | _digests,
    micro_catalog=st.none() | _digests,
    channel_tops=st.lists(_line, max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_manifests)
def test_property_parse_of_body_is_identity(manifest: Manifest) -> None:
    assert Manifest.parse(manifest.body()) == manifest
    assert Manifest.parse(manifest.body()).body() == manifest.body()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_property_arbitrary_bytes_raise_only_format_error(data: bytes) -> None:
    try:
        Manifest.parse(data)
    except FormatError:
        pass
    try:
        split_signed(data)
    except FormatError:
        pass


# --- meta-info ------------------------------------------------------------------------------


def test_metainfo_helpers() -> None:
    info = default_metainfo(administrator="Ada", recommended_stratum1s=["http://s1/cvmfs/x"])
    assert info["administrator"] == "Ada"
    assert info["recommended-stratum1s"] == ["http://s1/cvmfs/x"]
    assert parse_metainfo(format_metainfo(info), strict=True) == info
    assert format_metainfo(info).endswith(b"}\n")
    with pytest.raises(FormatError, match="not JSON"):
        parse_metainfo(b"{not json")
    with pytest.raises(FormatError, match="object"):
        parse_metainfo(b"[1, 2]")
    with pytest.raises(FormatError, match="UTF-8"):
        parse_metainfo(b'{"a": "\xff"}')
    with pytest.raises(FormatError, match="email"):
        parse_metainfo(b'{"email": 5}', strict=True)
    assert parse_metainfo(b'{"email": 5}') == {"email": 5}  # upstream accepts any object
    with pytest.raises(FormatError):
        format_metainfo({"x": float("nan")})
