"""Registry credentials from the auth file docker, podman, skopeo and oras already write.

Looked up in this order, first file that exists wins: ``$REGISTRY_AUTH_FILE`` (podman, skopeo),
``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json`` (docker login, oras login). Entries are
``{"auths": {"HOST": {"auth": base64("user:password")}}}`` (or ``username``/``password``);
hosts may be written with a scheme or path (``https://index.docker.io/v1/``). Credential
helpers (``credsStore``) are not run: a sync daemon should not start other programs to log in.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from cvmfs_ml.errors import ConfigError

__all__ = ["AuthFile", "default_auth_file"]

_DOCKER_HUB_ALIASES = (
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
)
MAX_AUTH_FILE_BYTES = 1 * 2**20


def default_auth_file() -> Path | None:
    candidates = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        candidates.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("DOCKER_CONFIG"):
        candidates.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    candidates.append(Path.home() / ".docker" / "config.json")
    return next((c for c in candidates if c.is_file()), None)


def _host(key: str) -> str:
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


@dataclass
class AuthFile:
    """Credentials by registry host."""

    path: Path | None = None
    entries: dict[str, tuple[str, str]] = field(default_factory=dict)
    lookup: bool = False  # found by the default lookup (no file named): :meth:`reload` redoes it

    @classmethod
    def load(cls, path: Path | None = None) -> AuthFile:
        """The file ``path``, or the first of the default lookup (none found: no entries)."""
        if path:
            return cls._read(Path(path))
        found = default_auth_file()
        return cls(lookup=True) if found is None else replace(cls._read(found), lookup=True)

    def reload(self) -> AuthFile:
        """The credentials as they are now: the lookup done again (a later ``docker login``
        is found, a removed file no longer used), or the named file read again (gone: no
        entries, until it is back). Entries given without a file stay as they are."""
        if self.lookup:
            return AuthFile.load()
        if self.path is None:
            return self
        if not self.path.exists():
            return AuthFile(self.path)
        return AuthFile._read(self.path)

    @property
    def in_use(self) -> Path | None:
        """The file the entries come from (None: none, or it is gone)."""
        return self.path if self.path is not None and self.entries else None

    @classmethod
    def _read(cls, path: Path) -> AuthFile:
        try:
            if path.stat().st_size > MAX_AUTH_FILE_BYTES:
                raise ConfigError(f"{path}: auth file larger than {MAX_AUTH_FILE_BYTES} bytes")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable registry auth file: {exc}") from exc
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            return cls(path)
        entries: dict[str, tuple[str, str]] = {}
        for key, value in auths.items():
            if not isinstance(value, dict):
                continue
            user, password = value.get("username"), value.get("password")
            if value.get("auth"):
                try:
                    decoded = base64.b64decode(str(value["auth"]), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError) as exc:
                    raise ConfigError(f"{path}: entry {key!r}: 'auth' is not base64") from exc
                user, _, password = decoded.partition(":")
            if isinstance(user, str) and user and isinstance(password, str):
                entries[_host(str(key))] = (user, password)
        return cls(path, entries)

    def credentials(self, registry: str) -> tuple[str | None, str | None]:
        host = registry.lower()
        names = _DOCKER_HUB_ALIASES if host in _DOCKER_HUB_ALIASES else (host,)
        for name in names:
            if name in self.entries:
                return self.entries[name]
        return None, None
