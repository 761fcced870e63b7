"""Repository meta-info, object kind ``M`` (cvmfs-format.md §9.3).

Free-form JSON shown by the client's ``repo_metainfo`` xattr. mkfs writes a skeleton that the
administrator edits [src: cvmfs/server/cvmfs_server_common.sh (create_repometa_skeleton)];
:data:`SKELETON` is that text byte for byte (the reference repository's ``M`` object is exactly
``zlib(SKELETON)``), so a repository we create names the same ``M`` object as upstream's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError

__all__ = [
    "KNOWN_KEYS",
    "SKELETON",
    "default_metainfo",
    "format_metainfo",
    "parse_metainfo",
]

SKELETON = (
    b"{\n"
    b'  "administrator" : "Your Name",\n'
    b'  "email"         : "you@organisation.org",\n'
    b'  "organisation"  : "Your Organisation",\n'
    b'  "description"   : "Repository content",\n'
    b'  "url"           : "Project website",\n'
    b'  "recommended-stratum0":  "stratum 0 url",\n'
    b'  "recommended-stratum1s" : [ "stratum1 url", "stratum1 url" ],\n'
    b"\n"
    b'  "custom" : {\n'
    b'    "_comment" : "Put arbitrary structured data here"\n'
    b"  }\n"
    b"}\n"
)
"""What mkfs writes before anyone edits it."""

KNOWN_KEYS: Mapping[str, type] = {
    "administrator": str,
    "email": str,
    "organisation": str,
    "description": str,
    "url": str,
    "recommended-stratum0": str,
    "recommended-stratum1s": list,
    "custom": dict,
}
"""Keys upstream's documentation suggests, with the JSON type each should have."""

_WHAT = "meta-info"


def default_metainfo(**overrides: Any) -> dict[str, Any]:
    """The skeleton as a dict, with ``overrides`` applied (use ``_`` for ``-`` in key names)."""
    info: dict[str, Any] = json.loads(SKELETON)
    for key, value in overrides.items():
        dashed = key.replace("_", "-")
        info[dashed if dashed in KNOWN_KEYS else key] = value
    return info


def parse_metainfo(data: bytes, *, strict: bool = False) -> dict[str, Any]:
    """Decode meta-info: UTF-8 JSON whose top level is an object.

    Upstream accepts any JSON object; with ``strict`` the suggested keys must also have their
    documented types (strings, a list of strings, an object), which a publisher should check
    before it uploads an edited file.
    """
    try:
        info = jsontext.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(_WHAT, f"not UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(
            _WHAT, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(info, dict):
        raise FormatError(_WHAT, f"the top level must be a JSON object, got {type(info).__name__}")
    if strict:
        _check_types(info)
    return info


def format_metainfo(info: Mapping[str, Any]) -> bytes:
    """Encode meta-info as indented UTF-8 JSON with a final newline (keys in given order)."""
    try:
        text = json.dumps(dict(info), indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FormatError(_WHAT, f"cannot be encoded as JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def _check_types(info: Mapping[str, Any]) -> None:
    for key, expected in KNOWN_KEYS.items():
        if key not in info:
            continue
        value = info[key]
        if not isinstance(value, expected):
            raise FormatError(_WHAT, f"{key!r} must be a JSON {expected.__name__}, got {value!r}")
        if expected is list and not all(isinstance(item, str) for item in value):
            raise FormatError(_WHAT, f"{key!r} must list strings, got {value!r}")
