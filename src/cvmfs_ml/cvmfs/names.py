"""Repository names (FQRNs): what upstream's URLs, key files and mount points can carry."""

from __future__ import annotations

import re

from cvmfs_ml.errors import ConfigError

__all__ = ["validate_fqrn"]

# A DNS-style name: labels of letters, digits, '-' and '_' joined by dots. The FQRN becomes a URL
# path segment (/cvmfs/<fqrn>), file names (<fqrn>.pub, .crt, .key), the whitelist's N line and
# a mount point, so spaces, slashes, shell or URL metacharacters must never get in.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_FQRN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_LENGTH = 253  # a DNS name's limit


def validate_fqrn(fqrn: str) -> str:
    """``fqrn`` unchanged, or :class:`ConfigError` naming what is wrong with it."""
    if not fqrn:
        raise ConfigError("the repository name is empty; use a name like models.example.org")
    if len(fqrn) > _MAX_LENGTH or not _FQRN.fullmatch(fqrn):
        raise ConfigError(
            f"{fqrn!r} is not a valid repository name: use letters, digits, '-' and '_' in "
            f"dot-separated labels of at most {_MAX_LENGTH} characters, e.g. models.example.org"
        )
    return fqrn
