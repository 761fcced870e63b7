"""The error hierarchy of cvmfs-ml.

Every error the package raises on purpose derives from :class:`CvmfsMlError`, so a caller can
catch them all in one place; each subclass says which party is at fault and carries the facts a
user needs to fix the problem (the path, the expected and the actual value, what was tried).

::

    CvmfsMlError
    ├── FormatError              bytes that do not parse (manifest, catalog, whitelist, header)
    │   └── IntegrityError       content whose hash is not the one it is addressed by
    ├── TrustError               a signature, key, whitelist or revision that must not be trusted
    │   ├── SignatureError
    │   ├── WhitelistExpiredError
    │   └── RollbackError        a revision older than one already seen
    ├── NotFoundError            a path or object that does not exist (also a FileNotFoundError)
    ├── UnsafeInputError         input that would escape or corrupt the tree (tar ``..``, devices)
    ├── PublishError             a transaction that cannot be committed
    │   └── LockedError          another publisher holds the repository lock
    ├── DownloadError            every host and proxy failed (carries the attempts)
    ├── CacheFullError           the client cache's disk has no room, even after eviction
    └── ConfigError              a configuration value that cannot be used
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Sequence

ECHO_LIMIT = 200
"""How many characters of one piece of user input a message repeats (:func:`bounded`)."""


def bounded(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` for an error message: at most its first ``limit`` characters, then ``...`` and
    the total length. Messages echo what they were given (a URI, a path, a reference); given
    6000 characters, they must not repeat all of them, once or several times."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class CvmfsMlError(Exception):
    """Root of every error raised on purpose by cvmfs-ml."""


class FormatError(CvmfsMlError, ValueError):
    """Bytes that do not follow the CVMFS (or a model) format.

    ``what`` names the thing being parsed (``".cvmfspublished"``, ``"catalog 90b6..."``).
    """

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class IntegrityError(FormatError):
    """Content whose hash differs from the name it was fetched or stored under."""

    def __init__(self, what: str, expected: str, got: str) -> None:
        super().__init__(what, f"hash mismatch: expected {expected}, got {got}")
        self.expected = expected
        self.got = got


class TrustError(CvmfsMlError):
    """Something that parsed but must not be trusted."""


class SignatureError(TrustError):
    """A signature that does not verify with the configured keys."""


class WhitelistExpiredError(TrustError):
    """The repository whitelist expired; the publisher must run ``resign``."""


class RollbackError(TrustError):
    """A manifest older than one this client already accepted."""


class NotFoundError(CvmfsMlError, FileNotFoundError):
    """A path in a repository, or an object in a store, that does not exist."""

    def __init__(self, path: str, where: str = "") -> None:
        message = f"no such file or directory: {path}" + (f" (in {where})" if where else "")
        super().__init__(2, message, path)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnsafeInputError(CvmfsMlError, ValueError):
    """Input that would write outside the tree or create something a repository must not hold."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"refusing {bounded(repr(member))}: {reason}")
        self.member = member
        self.reason = reason


class PublishError(CvmfsMlError):
    """A transaction that cannot be committed; the previous revision stays published."""


class LockedError(PublishError):
    """Another process holds a lock this one needs: a repository's (another publisher), a
    replica's, or a registry's data folder."""


class DownloadError(CvmfsMlError, OSError):
    """An object could not be fetched from any host through any proxy.

    ``attempts`` lists ``(url, proxy, reason)`` for every try, so the message shows what was tried.
    """

    def __init__(self, what: str, attempts: Sequence[tuple[str, str, str]] = ()) -> None:
        tried = "; ".join(f"{url} via {proxy}: {reason}" for url, proxy, reason in attempts)
        super().__init__(f"could not fetch {what}" + (f" (tried {tried})" if tried else ""))
        self.what = what
        self.attempts = list(attempts)


class CacheFullError(CvmfsMlError, OSError):
    """The client cache's disk has no room for an object, even after evicting what it could
    (the disk is full of other files, or of entries that running processes pin)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(CvmfsMlError, ValueError):
    """A configuration value (URL list, proxy list, key, setting) that cannot be used."""


class StorageError(CvmfsMlError, OSError):
    """The object store (an S3 service) refused a request or could not be reached."""


class DamagedDatabaseError(CvmfsMlError):
    """A database of ours that holds state (not a cache) no longer opens: it is left as it is
    for its operator, who restores it or moves it aside."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk is full: a write's ENOSPC (or a quota's EDQUOT), or SQLite's
    "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


#: What reading a damaged SQLite file can raise. Python's ``sqlite3`` decodes SQLite's error
#: text as UTF-8, so a message that quotes a damaged schema (``near "CR\x80EATE"``) raises
#: ``UnicodeDecodeError`` instead of ``sqlite3.DatabaseError``; a reader of files from outside
#: catches both.
SQLITE_DAMAGE: tuple[type[Exception], ...] = (sqlite3.DatabaseError, UnicodeDecodeError)
