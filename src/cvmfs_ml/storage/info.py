"""What upstream servers publish for monitors: ``/cvmfs/info/v1/*.json`` and ``.cvmfs_status.json``.

Shapes from upstream's server scripts (cvmfs_server_json.sh, cvmfs_server_gc.sh):

* ``info/v1/repositories.json``: ``schema`` (1), version and OS fields, and two lists,
  ``repositories`` (Stratum 0s) and ``replicas`` (Stratum 1s), of ``{"name", "url"}`` plus
  ``"alias"`` when the folder name differs from the repository's name;
* ``info/v1/meta.json``: the administrator's own file (``ROOT/info/v1/meta.json``, as
  ``cvmfs_server update-info`` keeps it), or upstream's skeleton of it;
* each repository's ``.cvmfs_status.json``: ``last_gc`` (and, on replicas, ``last_snapshot``) in
  ``date --utc`` format, other keys kept as they were.

A folder is a replica when it holds ``.cvmfs_last_snapshot`` (written by every snapshot).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from cvmfs_ml import __version__
from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.errors import FormatError

__all__ = [
    "INFO_PREFIX",
    "STATUS_JSON",
    "date_utc",
    "info_document",
    "meta_json",
    "repositories_json",
    "updated_status",
]

INFO_PREFIX = "/cvmfs/info/v1/"
STATUS_JSON = ".cvmfs_status.json"
INFO_SCHEMA = 1
_MAX_JSON = 1 << 20  # an admin's meta.json or a status file larger than this is not read
_MAX_REPOSITORIES = 10_000

META_SKELETON: dict[str, Any] = {
    "administrator": "Your Name",
    "email": "you@organisation.org",
    "organisation": "Your Organisation",
    "custom": {"_comment": "Put arbitrary structured data here"},
}


def date_utc(when: dt.datetime | None = None) -> str:
    """``date --utc`` output (``Thu Dec  3 21:06:12 UTC 2026``), as cvmfs_server writes it.

    ``when`` defaults to now; a naive ``when`` is taken to be UTC already.
    """
    when = when or dt.datetime.now(dt.UTC)
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return f"{when:%a %b} {when.day:2d} {when:%H:%M:%S} UTC {when:%Y}"


def updated_status(existing: bytes | None, **fields: str) -> bytes:
    """A ``.cvmfs_status.json`` with ``fields`` set and every other key kept (jq ``.k="v"``)."""
    status: dict[str, Any] = {}
    if existing and len(existing) <= _MAX_JSON:
        try:
            loaded = jsontext.loads(existing)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            status = loaded
    status.update(fields)
    return (json.dumps(status, indent=2) + "\n").encode()


def _os_release() -> dict[str, str]:
    try:
        return platform.freedesktop_os_release()
    except OSError:
        return {}


def _repositories(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    stratum0: list[dict[str, Any]] = []
    stratum1: list[dict[str, Any]] = []
    with os.scandir(root) as entries:
        folders = sorted(e.name for e in entries if e.is_dir())[:_MAX_REPOSITORIES]
    for folder in folders:
        manifest_path = root / folder / ".cvmfspublished"
        try:
            raw = manifest_path.read_bytes()[:_MAX_JSON]
        except OSError:
            continue
        try:
            name = Manifest.parse(raw).fqrn or folder
        except FormatError:
            name = folder
        entry: dict[str, Any] = {"name": name}
        if name != folder:
            entry["alias"] = folder
        entry["url"] = f"/cvmfs/{folder}"
        replica = (root / folder / ".cvmfs_last_snapshot").is_file()
        (stratum1 if replica else stratum0).append(entry)
    return stratum0, stratum1


def repositories_json(root: Path) -> bytes:
    """``info/v1/repositories.json`` for the repositories in ``root`` (read now)."""
    release = _os_release()
    stratum0, stratum1 = _repositories(Path(root))
    document = {
        "schema": INFO_SCHEMA,
        "cvmfs_version": f"cvmfs-ml {__version__}",
        "os_id": release.get("ID", platform.system().lower()),
        "os_version_id": release.get("VERSION_ID", platform.release()),
        "os_pretty_name": release.get("PRETTY_NAME", platform.platform()),
        "repositories": stratum0,
        "replicas": stratum1,
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def meta_json(root: Path) -> bytes:
    """``ROOT/info/v1/meta.json`` when it holds a JSON object, else upstream's skeleton."""
    path = Path(root) / "info" / "v1" / "meta.json"
    try:
        raw = path.read_bytes() if path.stat().st_size <= _MAX_JSON else b""
        if isinstance(jsontext.loads(raw), dict):
            return raw
    except (OSError, ValueError):
        pass
    return (json.dumps(META_SKELETON, indent=2) + "\n").encode()


def info_document(root: Path, url_path: str) -> bytes | None:
    """The body for ``/cvmfs/info/v1/<name>.json``, or None when ``url_path`` is not one."""
    path = url_path.split("?", 1)[0]
    if path == INFO_PREFIX + "repositories.json":
        return repositories_json(root)
    if path == INFO_PREFIX + "meta.json":
        return meta_json(root)
    return None
