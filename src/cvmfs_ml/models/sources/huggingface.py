"""Hugging Face hub cache snapshots as model sources (ecosystem.md §5.3). Never downloads.

The hub cache keeps one folder per repository::

    <cache>/models--<org>--<name>/
        refs/main                  the commit hash ``main`` points to (also refs/pr/1, ...)
        blobs/<sha256 or git sha1> the content, once
        snapshots/<commit>/<path>  relative symlinks to ../../blobs/<hash>

A snapshot is published as plain files (its symlinks resolved, bounded by the ``models--*``
folder), with the repository id and commit in ``model.json``'s ``source``. Readers then load the
version folder as a local model directory; docs/model-layout.md shows how with
``HF_HUB_OFFLINE=1``.

Accepted sources: a ``snapshots/<commit>`` folder, a ``models--<org>--<name>`` folder (with a
ref or commit, default ``main``), or ``hf:<org>/<name>[@<ref-or-commit>]`` looked up in the
local cache (``HF_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import NotFoundError, UnsafeInputError
from cvmfs_ml.models.sources.local import (
    MAX_LIST_ITEMS,
    cut_value,
    detect_license,
    read_model_card,
    text_head,
)

__all__ = [
    "HfSnapshot",
    "describe_hf_snapshot",
    "find_hf_snapshot",
    "hub_cache_dir",
    "lookup_cached",
    "open_hf_snapshot",
    "parse_hf_spec",
    "repo_folder_name",
]

_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_FOLDER_RE = re.compile(r"(models|datasets|spaces)--(.+)")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: Model card keys copied into ``source`` when present.
_CARD_KEYS = ("license", "license_name", "library_name", "pipeline_tag", "base_model", "tags")


@dataclass(frozen=True)
class HfSnapshot:
    """One ``snapshots/<commit>`` folder and the repository it belongs to."""

    snapshot: Path
    repo_folder: Path
    repo_type: str  # model | dataset | space
    repo_id: str  # org/name (or a bare name for legacy repositories)
    revision: str  # the commit hash (the snapshot folder's name)
    refs: list[str] = field(default_factory=list)  # refs pointing at this commit


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub keeps its cache, by the same variables it reads."""
    env = os.environ if env is None else env
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``org/name`` -> ``models--org--name`` (the hub forbids ``--`` in names, so it splits)."""
    plural = {v: k for k, v in _PREFIXES.items()}[repo_type]
    return "--".join([plural, *repo_id.split("/")])


def _parse_folder_name(name: str) -> tuple[str, str] | None:
    match = _FOLDER_RE.fullmatch(name)
    if match is None:
        return None
    return _PREFIXES[match.group(1)], "/".join(match.group(2).split("--"))


def _refs(repo_folder: Path) -> dict[str, str]:
    """``{ref name: commit}`` for every file below ``refs/`` (``main``, ``pr/1``...)."""
    base = repo_folder / "refs"
    out = {}
    if base.is_dir():
        for path in sorted(base.rglob("*")):
            if path.is_file():  # a commit hash: the first bytes are plenty
                out[path.relative_to(base).as_posix()] = (text_head(path, 256) or "").strip()
    return out


def find_hf_snapshot(path: Path, revision: str | None = None) -> HfSnapshot | None:
    """The snapshot ``path`` names, or None if ``path`` is not in the hub cache layout.

    ``path`` is a ``snapshots/<commit>`` folder, or a ``models--*`` folder in which case
    ``revision`` (a ref such as ``main`` or a commit hash; default ``main``) picks the snapshot.
    """
    path = Path(path).absolute()
    if path.parent.name == "snapshots" and path.is_dir():
        parsed = _parse_folder_name(path.parent.parent.name)
        if parsed is None:
            return None
        repo_folder = path.parent.parent
        commit = path.name
        if revision is not None and revision != commit:
            wanted = _refs(repo_folder).get(revision)
            if wanted != commit:
                raise NotFoundError(f"revision {revision!r} of {repo_folder} (this is {commit})")
    else:
        parsed = _parse_folder_name(path.name)
        if parsed is None or not (path / "snapshots").is_dir():
            return None
        repo_folder = path
        commit = _commit_for(repo_folder, revision or "main")
    snapshot = repo_folder / "snapshots" / commit
    if Path(os.path.realpath(repo_folder)) not in Path(os.path.realpath(snapshot)).parents:
        # like the links inside it, the snapshot folder may not lead out of models--*
        raise UnsafeInputError(str(snapshot), f"it leads outside {repo_folder}")
    refs = sorted(name for name, value in _refs(repo_folder).items() if value == commit)
    return HfSnapshot(
        snapshot=snapshot,
        repo_folder=repo_folder,
        repo_type=parsed[0],
        repo_id=parsed[1],
        revision=commit,
        refs=refs,
    )


def _commit_for(repo_folder: Path, revision: str) -> str:
    refs = _refs(repo_folder)
    commit = refs.get(revision, revision)
    if revision in refs and (commit in ("", ".", "..") or "/" in commit or "\\" in commit):
        # A hub cache from elsewhere: a ref must name a folder of snapshots/, not lead out of it.
        raise UnsafeInputError(f"{repo_folder}/refs/{revision}", f"names {commit!r}, not a commit")
    if (repo_folder / "snapshots" / commit).is_dir() and (
        revision in refs or _COMMIT_RE.fullmatch(commit)
    ):
        return commit
    known = sorted(refs) + sorted(p.name for p in (repo_folder / "snapshots").iterdir())
    raise NotFoundError(
        f"revision {revision!r} in {repo_folder} (cached: {', '.join(known) or 'nothing'})"
    )


def open_hf_snapshot(path: Path, revision: str | None = None) -> HfSnapshot:
    """Like :func:`find_hf_snapshot`, but a path outside the cache layout is an error."""
    found = find_hf_snapshot(path, revision)
    if found is None:
        raise NotFoundError(
            f"hub cache snapshot {path} (expected models--<org>--<name>[/snapshots/<commit>])"
        )
    return found


def parse_hf_spec(text: str) -> tuple[str, str | None]:
    """``hf:org/name@rev`` or ``hf://org/name`` -> (``org/name``, ``rev`` or None)."""
    body = text.removeprefix("hf:").lstrip("/")
    repo_id, _, revision = body.partition("@")
    if not repo_id or repo_id.count("/") > 1 or "--" in repo_id or ".." in repo_id:
        raise ValueError(f"invalid Hugging Face reference {text!r}: expected hf:ORG/NAME[@REV]")
    return repo_id, revision or None


def lookup_cached(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: Path | None = None,
    repo_type: str = "model",
) -> HfSnapshot:
    """The cached snapshot of ``repo_id`` at ``revision`` (default ``main``); no network."""
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    folder = cache / repo_folder_name(repo_id, repo_type)
    if not (folder / "snapshots").is_dir():
        raise NotFoundError(f"{repo_id} in the Hugging Face cache", str(cache))
    return open_hf_snapshot(folder, revision)


def describe_hf_snapshot(path: Path | HfSnapshot, revision: str | None = None) -> dict[str, Any]:
    """``source`` of ``model.json`` for a snapshot: repository, commit, refs, model card keys.

    ``refs`` keeps the first :data:`MAX_LIST_ITEMS` names, each cut as a card value is, with
    ``refs_count`` when there were more: a cache naming the commit 20,000 times made 4.5 MB of
    index, which every listing reads."""
    snap = path if isinstance(path, HfSnapshot) else open_hf_snapshot(path, revision)
    out: dict[str, Any] = {
        "type": "huggingface",
        "repo_type": snap.repo_type,
        "repo_id": snap.repo_id,
        "revision": snap.revision,
        "refs": [cut_value(name) for name in snap.refs[:MAX_LIST_ITEMS]],
    }
    if len(snap.refs) > MAX_LIST_ITEMS:
        out["refs_count"] = len(snap.refs)
    card = read_model_card(snap.snapshot)
    out.update({k: card[k] for k in _CARD_KEYS if card.get(k) not in (None, "", [])})
    license_ = detect_license(snap.snapshot)
    if license_:
        out["license"] = license_
    return out
