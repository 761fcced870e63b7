"""Key material as upstream ``cvmfs_server mkfs`` makes it (cvmfs-format.md §3.1, §3.2).

Upstream keeps four files per repository in ``/etc/cvmfs/keys``
[src: cvmfs/server/cvmfs_server_ssl.sh (create_master_key, create_cert)]:

* ``<fqrn>.masterkey``: the master private key (RSA 2048). It signs only the whitelist.
* ``<fqrn>.pub``: the master public key. Clients hold it (``CVMFS_PUBLIC_KEY``/``CVMFS_KEYS_DIR``).
* ``<fqrn>.key``: the repository private key (RSA 2048). It signs every manifest.
* ``<fqrn>.crt``: a self-signed X.509 certificate for that key, valid 365 days, with the common
  name ``"<fqrn, cut to 30 chars>[...] CernVM-FS Release Managers"``. Its fingerprint goes into
  the whitelist; the certificate itself is published as the ``X`` object.

Private keys are written as unencrypted PKCS#1 PEM (``BEGIN RSA PRIVATE KEY``), as
``openssl genrsa`` of OpenSSL 1.x does; public keys as ``BEGIN PUBLIC KEY`` (``openssl rsa
-pubout``). Both forms of each are accepted when reading.

This module only touches the key files it is given paths to; it never reads the environment.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cvmfs_ml.errors import ConfigError, FormatError

__all__ = [
    "KeyPaths",
    "KeySet",
    "certificate_common_name",
    "certificate_public_key",
    "dump_private_key",
    "dump_public_key",
    "generate_rsa_key",
    "load_certificate",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "make_certificate",
    "same_public_key",
]

DEFAULT_KEY_BITS = 2048
"""mkfs creates 2048-bit keys (``openssl genrsa ... 2048``)."""

CERTIFICATE_DAYS = 365
"""mkfs signs the certificate for 365 days (clients do not check the dates)."""

_CN_SUFFIX = " CernVM-FS Release Managers"
_CN_NAME_LIMIT = 30


def generate_rsa_key(bits: int = DEFAULT_KEY_BITS) -> rsa.RSAPrivateKey:
    """A fresh RSA key with exponent 65537, like ``openssl genrsa``."""
    if bits < 1024:
        raise ConfigError(f"refusing an RSA key of {bits} bits (at least 1024, upstream uses 2048)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def dump_private_key(key: rsa.RSAPrivateKey) -> bytes:
    """Unencrypted PKCS#1 PEM (``-----BEGIN RSA PRIVATE KEY-----``), the form upstream writes."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def dump_public_key(key: rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``), as ``openssl rsa -pubout``."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(pem: bytes, what: str = "private key") -> rsa.RSAPrivateKey:
    """Parse an unencrypted RSA private key (PKCS#1 or PKCS#8 PEM).

    Encrypted keys are refused: upstream's tools cannot use them either, and a publisher that
    stops to ask for a passphrase would hang unattended.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # raised for encrypted keys when no password is given
        raise ConfigError(f"{what} is encrypted; upstream keys are unencrypted PEM") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FormatError(what, f"not a PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise FormatError(what, f"CVMFS needs RSA keys, got {type(key).__name__}")
    return key


def load_public_key(pem: bytes, what: str = "public key") -> rsa.RSAPublicKey:
    """Parse an RSA public key (``BEGIN PUBLIC KEY`` or ``BEGIN RSA PUBLIC KEY`` PEM)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FormatError(what, f"not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise FormatError(what, f"CVMFS needs RSA keys, got {type(key).__name__}")
    return key


def load_certificate(pem: bytes, what: str = "certificate") -> x509.Certificate:
    """Parse a PEM X.509 certificate; DER is refused because upstream clients only read PEM."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise FormatError(what, f"not a PEM X.509 certificate: {exc}") from exc


def certificate_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """The RSA public key inside a PEM certificate: what verifies a manifest signature."""
    key = load_certificate(pem).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise FormatError("certificate", f"CVMFS needs an RSA key, got {type(key).__name__}")
    return key


def same_public_key(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    """Whether two RSA public keys are the same key (modulus and exponent)."""
    return a.public_numbers() == b.public_numbers()


def certificate_common_name(fqrn: str) -> str:
    """The CN mkfs puts in the certificate: names over 30 chars are cut and marked ``[...]``."""
    name = fqrn if len(fqrn) <= _CN_NAME_LIMIT else fqrn[:_CN_NAME_LIMIT] + "[...]"
    return name + _CN_SUFFIX


def make_certificate(
    fqrn: str,
    repo_key: rsa.RSAPrivateKey,
    now: dt.datetime,
    days: int = CERTIFICATE_DAYS,
) -> bytes:
    """A self-signed certificate for ``repo_key``, PEM, as ``create_cert`` in mkfs makes it.

    Upstream's ``openssl x509 -req -signkey`` yields an X.509 v1 certificate with a SHA-256
    signature; ``cryptography`` can only build v3, which is equivalent for CVMFS: clients use
    only the public key and the fingerprint, never the version, extensions or dates.
    """
    if not fqrn:
        raise ConfigError("a certificate needs a repository name")
    start = _utc(now).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certificate_common_name(fqrn))])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(repo_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(repo_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def load_public_keys(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[rsa.RSAPublicKey]:
    """Master public keys from a ``.pub`` file, a folder of ``*.pub`` or ``"a.pub:b.pub"``.

    This mirrors the client's two settings: ``CVMFS_PUBLIC_KEY`` (a colon-separated file list)
    and ``CVMFS_KEYS_DIR`` (every ``*.pub`` in the folder, sorted by name)
    [src: cvmfs/mountpoint.cc (CreateSignatureManager)]. A sequence of paths is also accepted.
    """
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if not text.strip():
            parts: list[str] = []  # Path("") would silently mean the current folder
        elif Path(text).exists():
            parts = [text]
        else:
            parts = [p for p in text.split(":") if p.strip()]
    else:
        parts = [os.fspath(p) for p in spec]
    if not parts:
        raise ConfigError("no public key given")
    keys: list[rsa.RSAPublicKey] = []
    for part in parts:
        path = Path(part)
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise ConfigError(f"no *.pub master key in {path}")
        elif path.is_file():
            files = [path]
        else:
            raise ConfigError(f"public key {path} does not exist")
        for file in files:
            keys.append(load_public_key(file.read_bytes(), what=str(file)))
    return keys


def _utc(when: dt.datetime) -> dt.datetime:
    """``when`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    The temp file is created with ``mode`` from the start, so a private key is never readable by
    others, not even for a moment; a crash leaves either the old file or none.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class KeyPaths(NamedTuple):
    """The upstream file names of one repository's keys inside a keys folder."""

    master_public: Path
    master_private: Path
    repo_private: Path
    certificate: Path

    @classmethod
    def for_repo(cls, folder: str | os.PathLike[str], fqrn: str) -> KeyPaths:
        base = Path(folder)
        return cls(
            master_public=base / f"{fqrn}.pub",
            master_private=base / f"{fqrn}.masterkey",
            repo_private=base / f"{fqrn}.key",
            certificate=base / f"{fqrn}.crt",
        )


@dataclass(frozen=True)
class KeySet:
    """One repository's keys, loaded from (or written to) a keys folder in upstream's layout.

    ``master_private`` is ``None`` when the folder holds only the public master key, as on a
    publisher whose whitelist is signed elsewhere (for example with a smart card).
    """

    folder: Path
    fqrn: str
    master_public: rsa.RSAPublicKey
    master_private: rsa.RSAPrivateKey | None
    repo_private: rsa.RSAPrivateKey
    certificate_pem: bytes

    @property
    def paths(self) -> KeyPaths:
        return KeyPaths.for_repo(self.folder, self.fqrn)

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        fqrn: str,
        now: dt.datetime,
        *,
        bits: int = DEFAULT_KEY_BITS,
        overwrite: bool = False,
    ) -> KeySet:
        """Make and write a new master key, repository key and certificate, as mkfs does.

        Private keys get mode 0600, public files 0644. Existing key files are never replaced
        unless ``overwrite`` is set: losing a master key means every client must be reconfigured.
        """
        base = Path(folder)
        paths = KeyPaths.for_repo(base, fqrn)
        if not overwrite:
            existing = [str(p) for p in paths if p.exists()]
            if existing:
                raise ConfigError(f"key files already exist: {', '.join(existing)}")
        base.mkdir(parents=True, exist_ok=True)
        master = generate_rsa_key(bits)
        repo = generate_rsa_key(bits)
        certificate = make_certificate(fqrn, repo, now)
        _write_atomic(paths.master_private, dump_private_key(master), 0o600)
        _write_atomic(paths.master_public, dump_public_key(master.public_key()), 0o644)
        _write_atomic(paths.repo_private, dump_private_key(repo), 0o600)
        _write_atomic(paths.certificate, certificate, 0o644)
        return cls(base, fqrn, master.public_key(), master, repo, certificate)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], fqrn: str) -> KeySet:
        """Read a keys folder; the master private key is optional, the rest is required.

        The certificate must carry the repository key's public half, otherwise every manifest
        signed with this set would fail verification on clients.
        """
        base = Path(folder)
        paths = KeyPaths.for_repo(base, fqrn)
        for required in (paths.master_public, paths.repo_private, paths.certificate):
            if not required.is_file():
                raise ConfigError(f"missing key file {required}")
        master_public = load_public_key(paths.master_public.read_bytes(), str(paths.master_public))
        master_private = None
        if paths.master_private.is_file():
            master_private = load_private_key(
                paths.master_private.read_bytes(), str(paths.master_private)
            )
            if not same_public_key(master_private.public_key(), master_public):
                raise ConfigError(f"{paths.master_private} does not match {paths.master_public}")
        repo_private = load_private_key(paths.repo_private.read_bytes(), str(paths.repo_private))
        certificate_pem = paths.certificate.read_bytes()
        if not same_public_key(certificate_public_key(certificate_pem), repo_private.public_key()):
            raise ConfigError(f"{paths.certificate} is not the certificate of {paths.repo_private}")
        return cls(base, fqrn, master_public, master_private, repo_private, certificate_pem)
