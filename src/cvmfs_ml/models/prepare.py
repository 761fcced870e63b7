"""Preparing a model version outside the publisher's lock: scanning and hashing the source,
describing its model files for ``model.json``, and the items the version folder is made of.

This is the slow part of a publish (every byte is read and hashed), so
:mod:`cvmfs_ml.models.publish` runs it before taking the repository lock, and concurrent
publishers hash in parallel.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.errors import PublishError
from cvmfs_ml.models import formats
from cvmfs_ml.models.formats import ModelDescription, describe, describe_folder, detect
from cvmfs_ml.models.layout import MODEL_JSON, ModelRef
from cvmfs_ml.models.sources.huggingface import describe_hf_snapshot, find_hf_snapshot
from cvmfs_ml.models.sources.limits import MAX_CATALOGS
from cvmfs_ml.models.sources.local import (
    SourceFile,
    SourceTree,
    describe_local,
    detect_license,
    hash_tree,
    open_regular,
    scan_source,
)
from cvmfs_ml.publish.filecache import FileKey
from cvmfs_ml.publish.sources import SourceItem

__all__ = [
    "compact_description",
    "describe_models",
    "prepare_source",
    "primary_format",
    "version_items",
    "whoami",
]

# Metadata values longer than this (as JSON) stay out of model.json: headers can carry large
# values (vocabularies, embedded configs) that belong in the model file, not in model.json.
_MAX_METADATA_JSON = 2048
_MAX_TENSORS_LISTED = 64
# What a model file says of itself is anyone's text: a 200 kB header named one tensor with
# 100,000 characters, which went whole into model.json (and a dtype of as many into a warning).
_MAX_NAME = 256  # characters of a tensor name, a dtype, a metadata key
_MAX_KEYS = 256  # metadata keys kept
_MAX_WARNING = 1024  # characters of a warning
_LEFT_OUT_NAMED = 10  # model files named in the warning about those not described


def prepare_source(
    src: Path, known_sha256: Mapping[str, str] | None = None, *, max_catalogs: int = MAX_CATALOGS
) -> tuple[SourceTree, dict[str, Any], str | None]:
    """Scan and hash ``src``: (tree, detected ``source`` info, detected license).

    ``known_sha256``: files (by relative path) whose digest is already known (not read again).
    ``max_catalogs``: how many ``.cvmfscatalog`` files (nested catalogs) it may hold.

    A Hugging Face cache snapshot (``snapshots/<commit>`` or ``models--*`` folder) is resolved
    within its ``models--*`` folder; anything else is a local file or folder.
    """
    src = Path(src)
    snapshot = find_hf_snapshot(src) if src.is_dir() else None
    if snapshot is not None:
        tree = scan_source(snapshot.snapshot, bound=snapshot.repo_folder,
                           max_catalogs=max_catalogs)  # fmt: skip
        info = describe_hf_snapshot(snapshot)
        license_ = info.get("license")
    else:
        tree = scan_source(src, max_catalogs=max_catalogs)
        info = describe_local(src)
        license_ = detect_license(src) if src.is_dir() else None
    if not tree.files:
        raise PublishError(f"{src} holds no files to publish")
    if any(f.path == MODEL_JSON for f in tree.files):
        raise PublishError(
            f"{src} has a top-level {MODEL_JSON}: that name is reserved for the metadata "
            "cvmfs-ml writes; rename the file"
        )
    return hash_tree(tree, known=known_sha256), info, license_


def _cut(text: str, limit: int = _MAX_NAME) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(out: dict[str, Any], key: str, items: list[Any], limit: int = _MAX_NAME) -> None:
    """``out[key]``: the first 64 of ``items``, each cut at ``limit`` characters, and
    ``<key>_count`` when there were more."""
    out[key] = [_cut(str(item), limit) for item in items[:_MAX_TENSORS_LISTED]]
    if len(items) > _MAX_TENSORS_LISTED:
        out[f"{key}_count"] = len(items)


def compact_description(desc: ModelDescription) -> dict[str, Any]:
    """``desc`` as ``model.json`` holds it: no per-tensor list, and what the file says of itself
    bounded (it is anyone's file): metadata values over 2 kB as JSON left out, at most
    :data:`_MAX_KEYS` metadata keys, names and dtypes cut at :data:`_MAX_NAME` characters,
    warnings at :data:`_MAX_WARNING`, lists at 64 items."""
    out = desc.to_json(weights=False)
    kept, omitted = {}, []
    for key, value in out.get("metadata", {}).items():
        if (len(key) <= _MAX_NAME and len(kept) < _MAX_KEYS
                and len(json.dumps(value, default=str)) <= _MAX_METADATA_JSON):  # fmt: skip
            kept[key] = value
        else:
            omitted.append(key)
    out["metadata"] = kept
    if omitted:
        _listed(out, "metadata_omitted", sorted(omitted))
    for key in ("inputs", "outputs"):
        if len(out[key]) > _MAX_TENSORS_LISTED:
            out[f"{key}_count"] = len(out[key])
        out[key] = [{**t, "name": _cut(str(t["name"])), "dtype": _cut(str(t["dtype"]))}
                    for t in out[key][:_MAX_TENSORS_LISTED]]  # fmt: skip
    dtypes = list(out["dtypes"].items())
    if len(dtypes) > _MAX_TENSORS_LISTED:  # the most used ones
        dtypes.sort(key=lambda item: -item[1] if isinstance(item[1], int) else 0)
        out["dtypes_count"] = len(dtypes)
    out["dtypes"] = {_cut(str(name)): count for name, count in dtypes[:_MAX_TENSORS_LISTED]}
    _listed(out, "external_data", out["external_data"])
    _listed(out, "warnings", out["warnings"], _MAX_WARNING)
    return out


def describe_models(tree: SourceTree) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Header-only descriptions of the model files; advisory, so it never blocks a publish.

    Past :data:`~cvmfs_ml.models.formats.MAX_DESCRIBED` model files (or ``MAX_ISOLATED`` of
    the formats read in a child process) the rest are named in one warning, not described."""
    left_out: list[str] = []
    try:
        if tree.root.is_dir():
            found = describe_folder(tree.root, strict=False, left_out=left_out)
        else:
            only = tree.files[0]
            if detect(only.real, name=only.path) is None:
                return {}, []
            found = {only.path: describe(only.real, name=only.path)}
    except Exception as exc:  # a parser bug must not make a model unpublishable
        return {}, [f"could not describe the model files: {type(exc).__name__}: {exc}"]
    warnings = [_cut(f"{path}: {w}", _MAX_WARNING) for path, d in found.items()
                for w in d.warnings[:_MAX_TENSORS_LISTED]]  # fmt: skip
    if left_out:
        named = left_out[:_LEFT_OUT_NAMED]
        more = f" and {len(left_out) - len(named)} more" if len(left_out) > len(named) else ""
        warnings.append(
            f"{len(left_out)} model files not described (at most {formats.MAX_DESCRIBED} per"
            f" version, {formats.MAX_ISOLATED} of them read in a child process):"
            f" {', '.join(named)}{more}"
        )
    return {path: compact_description(d) for path, d in found.items()}, warnings


def primary_format(models: dict[str, dict[str, Any]], tree: SourceTree) -> str | None:
    """The format of the model holding the most bytes (a folder model counts its files)."""

    def weight(path: str) -> int:
        if path == ".":
            return tree.size
        return sum(f.size for f in tree.files if f.path == path or f.path.startswith(path + "/"))

    if not models:
        return None
    return models[max(models, key=lambda p: (weight(p), p))]["format"]


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _opener(file: SourceFile) -> Callable[[], BinaryIO]:
    """Opens ``file`` for the publisher: still a regular file, and still the one hashed."""
    return lambda: open_regular(file.real, file.path, stamp=file.stamp)


def _file_key(path: Path, size: int) -> FileKey | None:
    """What lets the publisher's file cache reuse a file it stored before, unread (the same key
    as for ``add_folder``: device, inode, size and times; the registry also primes it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size != size:
        return None
    return FileKey.of(st)


def version_items(tree: SourceTree, ref: ModelRef, model_json: bytes) -> list[SourceItem]:
    """The version folder, its sub-folders, files and ``model.json``, parents first."""
    now = int(time.time())
    base = ref.path
    items = [SourceItem(path=base, mode=stat.S_IFDIR | 0o755, mtime=now, size=4096)]
    items += [
        SourceItem(path=f"{base}/{d}", mode=stat.S_IFDIR | 0o755, mtime=now, size=4096)
        for d in sorted(tree.dirs)
    ]
    for f in tree.files:
        mode = 0o755 if f.mode & 0o111 else 0o644
        items.append(
            SourceItem(
                path=f"{base}/{f.path}",
                mode=stat.S_IFREG | mode,
                mtime=f.mtime,
                size=f.size,
                open=_opener(f),
                file_key=_file_key(f.real, f.size),
            )
        )
    items.append(
        SourceItem(
            path=f"{base}/{MODEL_JSON}",
            mode=stat.S_IFREG | 0o644,
            mtime=now,
            size=len(model_json),
            open=lambda: io.BytesIO(model_json),
        )
    )
    return items
