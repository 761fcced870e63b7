"""KServe storage initializer for ``cvmfs://`` URIs (``cvmfs-ml kserve-init URI DEST ...``).

KServe has no plugin hook in ``kserve_storage``: a new scheme is an initializer image whose
entry point takes ``uri dest [uri dest ...]`` (the webhook passes ``/mnt/models`` as ``dest``,
an ``emptyDir``), registered with a ``ClusterStorageContainer`` (``deploy/kserve/``). This is
that entry point:

* ``cvmfs://<fqrn>/<path>``: a file or folder of the repository;
* ``cvmfs://<fqrn>/<ns>/<name>:<alias-or-version>``: a model version (the alias is read once).

Where ``/cvmfs/<fqrn>`` (or ``CVMFS_MOUNT_DIR/<fqrn>``) is mounted in the init container the
destination gets symlinks into the mount, exactly what ``kserve_storage`` does for a local path
(the serving container must mount ``/cvmfs`` at the same place). Otherwise the files are read
through the client (parallel prefetch, every piece verified) and written into ``dest``.

Symlinks in the model folder. KServe's own initializer copies files (or links a local path), and
a link copied as it is dangles when its target is outside the folder; following links blindly
would let a hostile model make the initializer copy ``/etc/shadow`` into the served folder. So:

* with a mount, ``dest`` links into the mount, and every link in it behaves exactly as on the
  node's ``/cvmfs`` (the serving container mounts it at the same place); nothing is read here;
* in a copy, a link that leads to something inside the folder stays a link; one that leads out
  of the folder to a regular file of the same repository becomes that file's bytes (read from
  the repository and verified, so a model sharing weights with another still loads); any other
  one (to a folder elsewhere, out of the repository, to nothing) is written as the same link and
  reported in one warning line. Nothing outside the repository is ever read, and a linked
  folder is never copied whole (a link to the repository's root would copy all of it).

Every URI is checked (syntax, then that the repository answers and the path exists) before
anything is written, and a destination is filled only once complete; so a bad URI leaves every
``dest`` as it was. Failures raise :class:`~cvmfs_ml.errors.CvmfsMlError`; the CLI prints one
line and exits 1, which KServe reports as the init container's failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError, NotFoundError
from cvmfs_ml.models.materialise import link_tree, materialise
from cvmfs_ml.models.refs import (
    CvmfsUri,
    check_version,
    local_dest,
    mount_roots,
    mounted_root,
    parse_uri,
    resolve_in_mount,
)

__all__ = ["Initialised", "initialise", "pair_arguments"]


@dataclass(frozen=True)
class Initialised:
    """One ``uri dest`` pair done: how (``link`` from a mount or ``copy``) and from where."""

    uri: str
    dest: Path
    how: str
    source: str


def pair_arguments(args: Sequence[str]) -> list[tuple[str, Path]]:
    """KServe's ``uri dest [uri dest ...]`` as pairs; an odd count is an error."""
    if not args or len(args) % 2:
        raise ConfigError("expected URI DEST pairs: cvmfs-ml kserve-init URI DEST [URI DEST ...]")
    pairs = [(args[i], local_dest(args[i + 1])) for i in range(0, len(args), 2)]
    dests = [os.path.abspath(dest) for _, dest in pairs]
    if len(set(dests)) != len(dests):
        raise ConfigError("each URI needs its own DEST folder")
    # A DEST inside another would be written into the first model's folder (an extra folder
    # in what the server loads): refused before anything is written.
    for outer in dests:
        inner = next((d for d in dests if d.startswith(outer.rstrip(os.sep) + os.sep)), None)
        if inner is not None:
            raise ConfigError(f"DEST {inner} is inside DEST {outer}; give each URI its own folder")
    return pairs


@dataclass
class _Plan:
    uri: CvmfsUri
    text: str
    dest: Path
    mount: Path | None = None
    found: Path | None = None
    repository: Any = None
    path: str = ""


def _check_dest(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ConfigError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ConfigError(f"{dest} is not empty; KServe hands the initializer an empty folder")


def _fill(plan: _Plan, progress: Callable[[int], None] | None,
          warn: Callable[[str], None] | None) -> Initialised:  # fmt: skip
    if plan.found is not None:
        link_tree(plan.found, plan.dest)
        return Initialised(plan.text, plan.dest, "link", str(plan.found))
    materialise(plan.repository, plan.path, plan.dest, progress=progress, warn=warn)
    return Initialised(plan.text, plan.dest, "copy", f"{plan.uri.fqrn}:{plan.path or '/'}")


def _empty(dest: Path, *, keep: bool) -> None:
    """Take back what was written at ``dest``: its entries, and the folder unless it was given."""
    if not keep:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for entry in dest.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def initialise(
    pairs: Sequence[tuple[str, Path]],
    *,
    config_files: Sequence[str | os.PathLike[str]] = (),
    env: Mapping[str, str] = os.environ,
    use_mount: bool = True,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Initialised]:
    """Fill each ``dest`` with its ``cvmfs://`` URI's file or folder (see the module docstring).

    All URIs are parsed, and all repositories opened and paths found, before the first write.
    ``warn`` hears of each link a copy keeps as it is (one line each).
    """
    from cvmfs_ml.client.config import load_config
    from cvmfs_ml.client.locate import open_target

    plans = [_Plan(parse_uri(text), text, Path(dest)) for text, dest in pairs]
    opened: dict[str, Any] = {}
    try:
        for plan in plans:
            _check_dest(plan.dest)
            fqrn = plan.uri.fqrn or ""
            config = load_config(fqrn, list(config_files), env)
            mount = mounted_root(fqrn, mount_roots(env, config.params)) if use_mount else None
            if mount is not None:
                plan.mount, plan.found = mount, resolve_in_mount(mount, plan.uri.path)
                check_version(plan.uri, str(plan.found.relative_to(os.path.realpath(mount))))
                continue
            if fqrn not in opened:
                opened[fqrn] = open_target(fqrn, config_files=config_files, env=env)
            plan.repository = opened[fqrn]
            entry = plan.repository.resolve(plan.uri.path)
            if plan.uri.model is not None and not entry.is_dir:
                raise NotFoundError(f"model version {plan.uri}", fqrn)
            check_version(plan.uri, entry.path)
            plan.path = entry.path
        done: list[Initialised] = []
        existed = {plan.dest: plan.dest.is_dir() for plan in plans}
        try:
            for plan in plans:
                done.append(_fill(plan, progress, warn))
        except BaseException:
            for item in done:  # a failure writes nothing: a restarted container starts over
                with contextlib.suppress(OSError):
                    _empty(item.dest, keep=existed[item.dest])
            raise
        return done
    finally:
        for repository in opened.values():
            repository.close()
