"""Key material helpers: PEM forms, the mkfs certificate, key folders and key lists."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cvmfs_ml.cvmfs.keys import (
    KeyPaths,
    KeySet,
    certificate_common_name,
    certificate_public_key,
    dump_private_key,
    dump_public_key,
    generate_rsa_key,
    load_certificate,
    load_private_key,
    load_public_key,
    load_public_keys,
    make_certificate,
    same_public_key,
)
from cvmfs_ml.errors import ConfigError, FormatError

FQRN = "keys.test.local"
NOW = dt.datetime(2026, 11, 22, 12, 30, 15, 999, tzinfo=dt.UTC)
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def key():
    return generate_rsa_key()


@pytest.fixture(scope="module")
def keyset_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    KeySet.create(folder, FQRN, NOW)
    return folder


def test_pem_forms_match_upstream(key) -> None:
    private = dump_private_key(key)
    public = dump_public_key(key.public_key())
    assert private.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert key.key_size == 2048 and key.public_key().public_numbers().e == 65537
    assert same_public_key(load_private_key(private).public_key(), key.public_key())
    assert same_public_key(load_public_key(public), key.public_key())
    # PKCS#8 private keys and PKCS#1 public keys (other openssl versions) load too
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert same_public_key(load_private_key(pkcs8).public_key(), key.public_key())
    pkcs1_pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    assert same_public_key(load_public_key(pkcs1_pub), key.public_key())


def test_bad_keys_are_refused(key) -> None:
    with pytest.raises(FormatError):
        load_private_key(b"not a key")
    with pytest.raises(FormatError):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError, match="encrypted"):
        load_private_key(encrypted)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(FormatError, match="RSA"):
        load_private_key(ec_pem)
    with pytest.raises(ConfigError):
        generate_rsa_key(512)


def test_certificate_like_mkfs(key) -> None:
    pem = make_certificate(FQRN, key, NOW)
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----\n")
    certificate = load_certificate(pem)
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "keys.test.local CernVM-FS Release Managers"
    assert certificate.issuer == certificate.subject
    assert certificate.not_valid_before_utc == NOW.replace(microsecond=0)
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == dt.timedelta(365)
    assert same_public_key(certificate_public_key(pem), key.public_key())
    certificate.verify_directly_issued_by(certificate)  # self-signed
    with pytest.raises(FormatError):
        load_certificate(certificate.public_bytes(serialization.Encoding.DER))


def test_long_names_are_cut_like_mkfs() -> None:
    name = "a-very-long-repository-name.example.org"
    assert certificate_common_name(name) == (
        "a-very-long-repository-name.ex[...] CernVM-FS Release Managers"
    )
    assert certificate_common_name("x" * 30) == "x" * 30 + " CernVM-FS Release Managers"


def test_reference_keys_load(reference_repo: Path) -> None:
    keys = reference_repo / "keys"
    crt = (keys / "ref.test.local.crt").read_bytes()
    repo_pub = load_public_key((keys / "ref.test.local.repokey.pub").read_bytes())
    assert same_public_key(certificate_public_key(crt), repo_pub)
    [master] = load_public_keys(keys / "ref.test.local.pub")
    assert master.key_size == 2048
    assert not same_public_key(master, repo_pub)
    subject = load_certificate(crt).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert subject == certificate_common_name("ref.test.local")


def test_load_public_keys_forms(tmp_path: Path, key) -> None:
    other = generate_rsa_key()
    (tmp_path / "b.pub").write_bytes(dump_public_key(key.public_key()))
    (tmp_path / "a.pub").write_bytes(dump_public_key(other.public_key()))
    (tmp_path / "ignored.key").write_bytes(b"not a public key")
    from_dir = load_public_keys(tmp_path)
    assert [k.public_numbers() for k in from_dir] == [
        other.public_key().public_numbers(),
        key.public_key().public_numbers(),
    ]
    colon = load_public_keys(f"{tmp_path / 'b.pub'}:{tmp_path / 'a.pub'}")
    assert same_public_key(colon[0], key.public_key()) and len(colon) == 2
    assert len(load_public_keys([tmp_path / "a.pub"])) == 1
    assert len(load_public_keys(str(tmp_path / "a.pub"))) == 1
    with pytest.raises(ConfigError, match="does not exist"):
        load_public_keys(tmp_path / "missing.pub")
    with pytest.raises(ConfigError, match="no public key"):
        load_public_keys("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.pub"):
        load_public_keys(empty)
    with pytest.raises(FormatError):
        load_public_keys(tmp_path / "ignored.key")


def test_keyset_files_and_modes(keyset_folder: Path) -> None:
    paths = KeyPaths.for_repo(keyset_folder, FQRN)
    assert [p.name for p in paths] == [
        f"{FQRN}.pub",
        f"{FQRN}.masterkey",
        f"{FQRN}.key",
        f"{FQRN}.crt",
    ]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes[f"{FQRN}.masterkey"] == 0o600 and modes[f"{FQRN}.key"] == 0o600
    assert modes[f"{FQRN}.pub"] == 0o644 and modes[f"{FQRN}.crt"] == 0o644
    assert sorted(p.name for p in keyset_folder.iterdir()) == sorted(p.name for p in paths)
    assert paths.master_private.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def test_keyset_load_round_trip(keyset_folder: Path) -> None:
    keys = KeySet.load(keyset_folder, FQRN)
    assert keys.master_private is not None
    assert same_public_key(keys.master_private.public_key(), keys.master_public)
    assert same_public_key(
        certificate_public_key(keys.certificate_pem), keys.repo_private.public_key()
    )
    assert not same_public_key(keys.master_public, keys.repo_private.public_key())
    assert keys.paths == KeyPaths.for_repo(keyset_folder, FQRN)
    cert = x509.load_pem_x509_certificate(keys.certificate_pem)
    assert FQRN in cert.subject.rfc4514_string()


def test_keyset_refuses_overwrite_and_mismatch(keyset_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already exist"):
        KeySet.create(keyset_folder, FQRN, NOW)
    copy = tmp_path / "copy"
    shutil.copytree(keyset_folder, copy)
    # a folder without the master private key (whitelist signed elsewhere) still loads
    (copy / f"{FQRN}.masterkey").unlink()
    assert KeySet.load(copy, FQRN).master_private is None
    # a certificate of another key must not pass
    (copy / f"{FQRN}.crt").chmod(0o644)
    (copy / f"{FQRN}.crt").write_bytes(make_certificate(FQRN, generate_rsa_key(), NOW))
    with pytest.raises(ConfigError, match="not the certificate"):
        KeySet.load(copy, FQRN)
    (copy / f"{FQRN}.key").unlink()
    with pytest.raises(ConfigError, match="missing key file"):
        KeySet.load(copy, FQRN)


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_reads_our_files(keyset_folder: Path) -> None:
    paths = KeyPaths.for_repo(keyset_folder, FQRN)
    check = subprocess.run(
        [OPENSSL, "rsa", "-check", "-noout", "-in", str(paths.repo_private)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    subject = subprocess.run(
        [OPENSSL, "x509", "-noout", "-subject", "-in", str(paths.certificate)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "CN = keys.test.local CernVM-FS Release Managers" in subject
    pub = subprocess.run(
        [OPENSSL, "rsa", "-pubout", "-in", str(paths.master_private)],
        check=True,
        capture_output=True,
    ).stdout
    assert pub == paths.master_public.read_bytes()
