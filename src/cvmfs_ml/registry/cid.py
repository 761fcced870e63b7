"""Content IDs: what a client may name its tarball, and where it lands in the repository.

The rules are user-pub's (``pyweb/cvmfs_user_pub.py``): a CID is any string unique per tarball,
normally a secure hash, with at most one ``/`` to group CIDs by project (``<group>/<hash>``);
it may not start with ``.`` nor hold ``'`` or ``\\``. We are stricter where a permissive rule
would be a hazard: no ``..``, no empty components, no control characters, bounded length.
A last component spelled ``sha256:<64 hex>`` is a *checked* CID: the body must hash to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cvmfs_ml.errors import CvmfsMlError

__all__ = ["MAX_CID_LENGTH", "ContentId", "InvalidCidError"]

MAX_CID_LENGTH = 256
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+=@,-]{0,199}")
_CHECKED = re.compile(r"sha256:([0-9a-fA-F]{64})")  # capitals too: Get-FileHash prints them


class InvalidCidError(CvmfsMlError, ValueError):
    """A content ID the service refuses (answered with ``400 Bad request``)."""


@dataclass(frozen=True)
class ContentId:
    """A validated content ID: ``group`` (or ``None``) and ``name``."""

    text: str

    @classmethod
    def parse(cls, text: str | None) -> ContentId:
        if not text:
            raise InvalidCidError("no cid")
        if len(text) > MAX_CID_LENGTH:
            raise InvalidCidError(f"cid longer than {MAX_CID_LENGTH} characters")
        if text.startswith("."):
            raise InvalidCidError('cid may not start with "."')
        if "'" in text or "\\" in text:
            raise InvalidCidError("disallowed character in cid")
        parts = text.split("/")
        if len(parts) > 2:
            raise InvalidCidError("at most one slash allowed in cid")
        for part in parts:
            if not _COMPONENT.fullmatch(part) or part in (".", ".."):
                raise InvalidCidError(
                    f"cid component {part!r} is not [A-Za-z0-9_][A-Za-z0-9_.:+=@,-]*"
                )
        if parts[-1].startswith("sha256:") and not _CHECKED.fullmatch(parts[-1]):
            # else taken as a plain name: a digest cut short published any body unchecked
            raise InvalidCidError("a sha256: cid needs the body's 64 hex digits after it")
        return cls(text)

    @property
    def group(self) -> str | None:
        """The namespace a token needs (``publish:<group>``); ``None`` for ungrouped CIDs."""
        return self.text.split("/", 1)[0] if "/" in self.text else None

    @property
    def name(self) -> str:
        return self.text.rsplit("/", 1)[-1]

    @property
    def expected_sha256(self) -> str | None:
        """For ``[group/]sha256:<hex>``, the hex digest the uploaded body must have."""
        match = _CHECKED.fullmatch(self.name)
        return match.group(1).lower() if match else None

    def repo_path(self, prefix: str) -> str:
        """The CID's folder inside the repository (``/sw/<cid>``)."""
        return f"/{prefix.strip('/')}/{self.text}"

    def __str__(self) -> str:
        return self.text
