"""The registry's configuration file (JSON) and the bearer tokens it holds, hashed.

A token is shown once, when created (``cvmfs-ml registry token add``); the file keeps only its
SHA-256, so reading the file does not reveal a usable token (tokens are 256 random bits, so a
plain hash is as strong as a slow one). The service re-reads the file when it changes on disk,
so a revoked token stops working at the next request, without a restart.

Scopes: ``read:NS``, ``publish:NS`` (implies ``read:NS``), ``admin`` (everything); ``NS`` is a
namespace (a CID group, a model namespace) or ``*`` for all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError

__all__ = [
    "Principal",
    "RegistryConfig",
    "ConfigFile",
    "TokenRecord",
    "add_token",
    "revoke_token",
    "parse_scope",
]

log = logging.getLogger("cvmfs_ml.registry")
TOKEN_PREFIX = "cvr_"
_SCOPE = re.compile(r"(read|publish):(\*|[A-Za-z0-9_][A-Za-z0-9_.-]{0,99})|admin")
_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")  # no '..'
_BOUNDS: dict[str, tuple[float, float, str]] = {  # each value that cannot work is refused
    "max_upload_bytes": (1, math.inf, "at least 1"),
    "max_unpacked_bytes": (1, math.inf, "at least 1"),
    "max_tar_members": (1, math.inf, "at least 1"),
    "max_tar_catalogs": (0, math.inf, "0 or more"),
    "max_tags_per_push": (1, math.inf, "at least 1"),
    "max_days": (math.ulp(0), math.inf, "more than 0 (days)"),
    "batch_max_jobs": (1, math.inf, "at least 1"),  # 0 claimed no job, ever
    "batch_max_bytes": (1, math.inf, "at least 1"),
    "uploads_per_minute": (0, math.inf, "0 (no limit) or more"),
    "max_receiving_uploads": (1, math.inf, "at least 1"),
    "max_upload_sessions": (1, math.inf, "at least 1"),
    "max_session_bytes": (1, math.inf, "at least 1"),
    "max_connections": (1, math.inf, "at least 1"),
    "max_queued_bytes": (1, math.inf, "at least 1"),
    "upload_low_speed_limit": (0, math.inf, "0 (no limit) or more"),
    "upload_low_speed_seconds": (0, 86400, "0 (no limit) to 86400"),
    "cleanup_hour": (-1, 23, "an hour 0-23, or -1 (never)"),
}


def parse_scope(text: str) -> str:
    text = text.strip()
    if not _SCOPE.fullmatch(text):
        raise ConfigError(f"scope {text!r}: use read:NAMESPACE, publish:NAMESPACE (or :*), admin")
    return text


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    name: str
    sha256: str
    scopes: tuple[str, ...]
    created: float
    revoked: bool = False


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token's name and scopes, or anonymous (no scopes)."""

    name: str
    scopes: tuple[str, ...] = ()

    @property
    def anonymous(self) -> bool:
        return self.name == "anonymous"

    def allows(self, action: str, namespace: str | None) -> bool:
        """``action`` is ``read`` or ``publish``; ``namespace`` ``None`` needs a ``*`` scope."""
        for scope in self.scopes:
            if scope == "admin":
                return True
            verb, _, ns = scope.partition(":")
            verb_ok = verb == action or (verb == "publish" and action == "read")
            if verb_ok and (ns == "*" or (namespace is not None and ns == namespace)):
                return True
        return False


@dataclass(frozen=True)
class RegistryConfig:
    """What ``registry serve --config FILE`` reads; every field has a safe default."""

    anonymous_read: bool = True
    max_upload_bytes: int = 4 * 2**30  # user-pub's LimitRequestBody
    max_unpacked_bytes: int = 16 * 2**30
    max_tar_members: int = 200_000
    max_tar_catalogs: int = 1000  # .cvmfscatalog files of one tarball or pushed model (limits.py)
    max_tags_per_push: int = 16  # tags one manifest PUT sets (its reference and ?tag=)
    prefix: str = "sw"
    max_days: float = 30.0
    batch_max_jobs: int = 64
    batch_max_bytes: int = 2 * 2**30
    uploads_per_minute: int = 0  # per token; 0: no limit
    max_receiving_uploads: int = 32  # OCI and resumable bodies at once, ~12 MiB each (bodies.py)
    max_upload_sessions: int = 100  # OCI and resumable sessions one token holds open at once
    max_session_bytes: int = 64 * 2**30  # bytes all open sessions hold on disk together
    max_connections: int = 1000  # HTTP connections open at once (registry/connections.py)
    max_queued_bytes: int = 64 * 2**30  # bytes of accepted bodies waiting to be published
    upload_low_speed_limit: int = 1024  # B/s an upload averages over each window; 0: no limit
    upload_low_speed_seconds: float = 60.0  # that window (registry/bodies.py)
    unpack_images: bool = True  # publish pushed container images unpacked (DUCC's .flat layout)
    image_registry: str = ""  # <registry> of pushed images' public links; "": the Host pushed to
    cleanup_hour: int = 3  # UTC hour of the daily cleanup (+1 per repository); -1: never
    preingest: bool = True  # store pushed blobs' objects while they upload (registry/preingest.py)
    tokens: dict[str, TokenRecord] = field(default_factory=dict)

    def authenticate(self, token: str) -> Principal | None:
        """The principal for ``token``, or ``None`` when unknown or revoked."""
        digest = hash_token(token)
        for record in self.tokens.values():
            if hmac.compare_digest(record.sha256, digest):
                return None if record.revoked else Principal(record.name, record.scopes)
        return None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens"] = {
            name: {**asdict(record), "scopes": list(record.scopes)}
            for name, record in self.tokens.items()
        }
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "registry config") -> RegistryConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        known = {f for f in cls.__dataclass_fields__ if f != "tokens"}
        unknown = set(data) - known - {"tokens"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {}
        defaults = cls()
        for key in known:
            if key in data:
                default = getattr(defaults, key)
                value = data[key]
                if isinstance(default, bool) != isinstance(value, bool) or not isinstance(
                    value, (type(default), int) if isinstance(default, float) else type(default)
                ):
                    raise ConfigError(f"{where}: {key} must be a {type(default).__name__}")
                low, high, what = _BOUNDS.get(key, (-math.inf, math.inf, ""))
                if isinstance(value, (int, float)) and not low <= value <= high:  # NaN too
                    raise ConfigError(f"{where}: {key} must be {what}, not {value}")
                if key == "prefix" and not _PREFIX.fullmatch(value):
                    raise ConfigError(f"{where}: prefix must be a relative path such as 'sw'"
                                      f" (no '..', '.' or leading '/'), not {value!r}")  # fmt: skip
                values[key] = value
        tokens: dict[str, TokenRecord] = {}
        for name, raw in (data.get("tokens") or {}).items():
            try:
                tokens[name] = TokenRecord(
                    name=name,
                    sha256=str(raw["sha256"]),
                    scopes=tuple(parse_scope(s) for s in raw["scopes"]),
                    created=float(raw.get("created", 0)),
                    revoked=bool(raw.get("revoked", False)),
                )
            except (KeyError, TypeError) as exc:
                raise ConfigError(f"{where}: token {name!r} lacks {exc}") from exc
        return cls(**values, tokens=tokens)


def load_config(path: Path | None) -> RegistryConfig:
    if path is None or not Path(path).exists():
        return RegistryConfig()
    try:
        return RegistryConfig.from_json(json.loads(Path(path).read_text()), str(path))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot read registry config {path}: {exc}") from exc


def save_config(path: Path, config: RegistryConfig) -> None:
    """Write atomically with mode 0600 (the file holds token hashes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config.to_json(), handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """One read-modify-write of the file at a time (``.<name>.lock`` beside it): two
    ``registry token add`` at once each wrote back what it had read, and one token, printed
    to its user, was never stored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # the lock goes with the handle


def add_token(path: Path, name: str, scopes: list[str]) -> str:
    """Create token ``name`` with ``scopes`` in the file at ``path``; returns the token."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,99}", name):
        raise ConfigError(f"token name {name!r}: letters, digits, '_', '.', '@', '-'")
    if not scopes:
        raise ConfigError("a token needs at least one --scope")
    parsed = tuple(parse_scope(s) for s in scopes)
    with _editing(path):
        config = load_config(path)
        existing = config.tokens.get(name)
        if existing is not None and not existing.revoked:
            raise ConfigError(f"token {name!r} exists; revoke it first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(name, hash_token(token), parsed, time.time())
        save_config(path, replace(config, tokens={**config.tokens, name: record}))
    return token


def revoke_token(path: Path, name: str) -> None:
    with _editing(path):
        config = load_config(path)
        record = config.tokens.get(name)
        if record is None:
            raise ConfigError(f"no token {name!r} in {path}")
        tokens = {**config.tokens, name: replace(record, revoked=True)}
        save_config(path, replace(config, tokens=tokens))


class ConfigFile:
    """The configuration, re-read whenever the file's mtime or size changes.

    A change that does not load (an editor half-way, a typo, the file removed) is logged once
    and the last good configuration stays in force until the file is fixed: raising it here
    answered every request 500 and killed the publishing threads, which read it each poll.
    """

    def __init__(self, path: Path | None, overrides: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._overrides = dict(overrides or {})
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._config = self._load()

    def _load(self) -> RegistryConfig:
        config = load_config(self.path)
        return replace(config, **self._overrides) if self._overrides else config

    def current(self) -> RegistryConfig:
        if self.path is None:
            return self._config
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                # Removed under the service: the defaults would forget every token and open
                # anonymous reads where they were closed. Kept, as a broken edit is.
                vanished = stamp is None and self._stamp is not None
                self._stamp = stamp
                try:
                    if vanished:
                        raise ConfigError(f"registry config {self.path} is gone")
                    self._config = self._load()
                except ConfigError as exc:
                    log.error("%s (the registry keeps its last good configuration until the"
                              " file is fixed)", exc)  # fmt: skip
            return self._config
