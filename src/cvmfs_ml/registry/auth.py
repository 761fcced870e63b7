"""Who a request comes from, and whether it may do what it asks.

``Authorization: Bearer <token>`` (or ``Basic`` with the token as password, which is what
``oras login``/``skopeo --creds`` send before the token flow). No header is the anonymous
principal: it may read when the configuration says so, and never write. An unknown or revoked
token answers 401 (the client must get a new one); a valid token without the scope answers
403. Tokens are compared by hash and never logged.
"""

from __future__ import annotations

import base64
import binascii

from cvmfs_ml.registry.config import Principal, RegistryConfig
from cvmfs_ml.registry.tarballs import RejectedError

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_TOKEN",
    "authenticate",
    "require",
    "require_reader",
    "token_from_header",
]

ANONYMOUS = Principal("anonymous")
ANONYMOUS_TOKEN = "anonymous"  # what /token hands out without credentials (anonymous_read)


def token_from_header(header: str) -> str:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RejectedError(401, "malformed Basic credentials", "auth") from None
        _user, _, password = decoded.partition(":")
        if password:
            return password
    raise RejectedError(401, "use 'Authorization: Bearer <token>'", "auth")


def authenticate(config: RegistryConfig, header: str | None) -> Principal:
    if not header:
        return ANONYMOUS
    token = token_from_header(header)
    if token == ANONYMOUS_TOKEN:
        return ANONYMOUS
    principal = config.authenticate(token)
    if principal is None:
        raise RejectedError(401, "unknown or revoked token", "auth")
    return principal


def require(config: RegistryConfig, who: Principal, action: str, namespace: str | None) -> None:
    """Raise 401/403 unless ``who`` may ``action`` (read, publish, admin) in ``namespace``."""
    if who.anonymous:
        if action == "read" and config.anonymous_read:
            return
        raise RejectedError(401, "a token is required", "auth")
    if action == "admin":
        if "admin" not in who.scopes:
            raise RejectedError(403, "this needs the admin scope", "forbidden")
        return
    if not who.allows(action, namespace):
        where = namespace if namespace is not None else "ungrouped CIDs (needs :*)"
        raise RejectedError(403, f"token {who.name!r} may not {action} {where}", "forbidden")


def require_reader(config: RegistryConfig, header: str | None) -> None:
    """For listings not tied to one namespace (repositories, the web page): anonymous
    visitors when ``anonymous_read``, any valid token otherwise."""
    principal = authenticate(config, header)
    if principal.anonymous:
        require(config, principal, "read", None)
