"""``cvmfs://<fqrn>/<ns>/<name>:<version>`` to a local folder, as ``snapshot_download`` would.

A reference names a model version (or an alias of one) in a repository; :func:`resolve` turns it
into a path on this machine that ordinary programs (onnxruntime, transformers, KServe's model
servers) can open:

* where the repository is mounted (``/cvmfs/<fqrn>``, or ``CVMFS_MOUNT_DIR/<fqrn>``; upstream's
  client or ours), the version's folder inside the mount: no copy, and the kernel and the mount's
  cache are shared by every process on the node;
* otherwise a copy materialised from the client's verified object cache under
  ``CVMFS_CACHE_BASE/materialised/<fqrn>/<ns>/<name>/<version>``: every piece is fetched in
  parallel and checked against its content hash by the client, then hard-linked from the cache
  where the file system allows (one copy of the bytes on disk) and copied where it does not.

Aliases are resolved once, to the version they point to at that moment, so a folder handed to a
server never changes under it. A complete materialised copy (it appears by one atomic rename)
is reused while it matches what the repository holds (:mod:`cvmfs_ml.models.copies`: a version
removed and published again with other bytes is copied again), and as it is, with a warning,
when the repository cannot be reached.

The same machinery serves the KServe storage initializer (:mod:`cvmfs_ml.integrations.kserve`)
for plain ``cvmfs://<fqrn>/<path>`` URIs: :func:`parse_uri`, :func:`mounted_root`,
:func:`link_tree` and :func:`materialise`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.client.config import default_cache_base
from cvmfs_ml.client.locate import open_target, target_fqrn
from cvmfs_ml.errors import (
    ConfigError,
    DownloadError,
    FormatError,
    NotFoundError,
    StorageError,
    UnsafeInputError,
)
from cvmfs_ml.models.copies import (
    content_id,
    record_path,
    recorded,
    set_aside,
    write_record,
)
from cvmfs_ml.models.layout import ALIAS_LATEST, ModelRef
from cvmfs_ml.models.materialise import Progress, Warn, is_complete, link_tree, materialise
from cvmfs_ml.models.tree import missing_version

__all__ = [
    "CvmfsUri",
    "Resolved",
    "check_version",
    "locate",
    "mount_roots",
    "mounted_root",
    "parse_ref",
    "parse_uri",
    "resolve",
    "resolve_in_mount",
    "resolve_path",
]

log = logging.getLogger(__name__)

SCHEME = "cvmfs://"
_FQRN_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*")
_MAX_PATH = 4096


@dataclass(frozen=True)
class CvmfsUri:
    """A parsed ``cvmfs://`` URI: the repository and either a path or a model reference.

    ``path`` is ``/``-separated, relative to the repository root, without ``.``/``..``;
    ``model`` is set for ``<ns>/<name>:<version-or-alias>`` and ``path`` is then the alias or
    version folder (``ns/name/alias``). ``fqrn`` is ``None`` for a bare ``ns/name:version``
    whose repository comes from elsewhere (``--repo``).
    """

    fqrn: str | None
    path: str
    model: ModelRef | None = None

    def __str__(self) -> str:
        where = (
            f"{self.model.namespace}/{self.model.name}:{self.model.version}"
            if self.model
            else self.path
        )
        return f"{SCHEME}{self.fqrn}/{where}" if self.fqrn else where


def _check_fqrn(fqrn: str, text: str) -> str:
    if len(fqrn) > 255 or _FQRN_RE.fullmatch(fqrn) is None:
        # The name is the start of ``text``, which the error shows: not repeated here.
        raise UnsafeInputError(
            text, f"the name after {SCHEME} is not a repository name (like models.example.org)"
        )
    return fqrn


def _clean_path(path: str, text: str) -> str:
    """``path`` with empty components dropped; ``.``/``..``, NUL and backslashes refused."""
    if len(path) > _MAX_PATH:
        raise UnsafeInputError(text, f"the path is longer than {_MAX_PATH} characters")
    if "\0" in path or "\\" in path:
        raise UnsafeInputError(text, "the path has a NUL or a backslash")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UnsafeInputError(text, "'.' and '..' are not allowed in a cvmfs:// path")
    return "/".join(parts)


def _model_part(path: str, text: str) -> ModelRef | None:
    """The model reference when ``path`` is ``ns/name:version`` (one ``:`` in the last part)."""
    parts = path.split("/")
    if ":" not in parts[-1]:
        return None
    if len(parts) != 2:
        raise UnsafeInputError(text, "a model reference is NAMESPACE/NAME:VERSION")
    try:
        return ModelRef.parse(path, require_version=True)
    except ValueError as exc:
        raise UnsafeInputError(text, str(exc)) from None


def parse_uri(text: str) -> CvmfsUri:
    """Parse ``cvmfs://<fqrn>/<path>`` or ``cvmfs://<fqrn>/<ns>/<name>:<alias>``.

    Raises :class:`UnsafeInputError` for anything else (other schemes, traversal, bad names).
    """
    if not isinstance(text, str) or not text.startswith(SCHEME):
        raise UnsafeInputError(str(text), f"not a {SCHEME}<fqrn>/<path> URI")
    fqrn, _, rest = text[len(SCHEME) :].partition("/")
    _check_fqrn(fqrn, text)
    path = _clean_path(rest, text)
    model = _model_part(path, text) if path else None
    if model is not None:
        path = model.alias_path(model.version or "").lstrip("/")
    return CvmfsUri(fqrn, path, model)


def parse_ref(text: str) -> CvmfsUri:
    """``cvmfs://<fqrn>/<ns>/<name>:<v>`` or ``<ns>/<name>[:<v>]`` (repository given elsewhere;
    without a version, ``latest``, as docs/model-layout.md has it)."""
    if text.startswith(SCHEME):
        uri = parse_uri(text)
        if uri.model is None:
            raise UnsafeInputError(text, "expected cvmfs://<fqrn>/<ns>/<name>:<version-or-alias>")
        return uri
    path = _clean_path(text, text)
    if path.count("/") == 1 and ":" not in path:
        path += f":{ALIAS_LATEST}"
    model = _model_part(path, text)
    if model is None:
        raise UnsafeInputError(text, "expected <ns>/<name>:<version-or-alias>")
    return CvmfsUri(None, model.alias_path(model.version or "").lstrip("/"), model)


# -- mounts ---------------------------------------------------------------------------------------
def local_dest(text: str, what: str = "DEST") -> Path:
    """An argument naming a local folder to write (``what``: DEST, --out); a URL (``http://``,
    ``s3://``...) is refused rather than taken for a folder named after its scheme
    (``Path("http://host/x")`` is ``http:/host/x``)."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ConfigError(f"{text} is a URL; {what} is a local folder to write")
    return Path(text)


def mount_roots(env: Mapping[str, str] = os.environ, params: Mapping[str, str] = {}) -> list[Path]:
    """Where repositories may be mounted: ``CVMFS_MOUNT_DIR`` (configuration, then environment),
    and ``/cvmfs``, upstream's default."""
    roots: list[Path] = []
    for text in (params.get("CVMFS_MOUNT_DIR", ""), env.get("CVMFS_MOUNT_DIR", ""), "/cvmfs"):
        if text.strip() and Path(text.strip()) not in roots:
            roots.append(Path(text.strip()))
    return roots


def mounted_root(fqrn: str, roots: Sequence[Path]) -> Path | None:
    """``<root>/<fqrn>`` for the first root where that repository is mounted, else ``None``.

    Stat first, so an autofs-managed ``/cvmfs`` mounts the repository on demand as it does for
    upstream's client.
    """
    for root in roots:
        point = root / fqrn
        try:
            os.stat(point)
        except OSError:
            continue
        if os.path.ismount(point):
            return point
    return None


def resolve_in_mount(mount: Path, path: str) -> Path:
    """``mount/path`` with symlinks (aliases) resolved; it must stay inside ``mount`` and exist."""
    top = Path(os.path.realpath(mount))
    found = Path(os.path.realpath(mount / path)) if path else top
    if found != top and top not in found.parents:
        raise UnsafeInputError(f"{mount}/{path}", "it leads outside the repository")
    if not found.exists():
        raise NotFoundError(path or "/", str(mount))
    return found


def check_version(uri: CvmfsUri, path: str) -> None:
    """A model reference must lead to a folder beside its alias (``prod -> 1.0``): an alias
    ``..`` or ``.`` would hand over the namespace or the model, every version in it."""
    if uri.model is None:
        return
    if posixpath.dirname("/" + path.strip("/")) != "/" + uri.model.model_path.strip("/"):
        raise FormatError(str(uri), f"leads to /{path.strip('/')}, not a version of the model")


def resolve_path(repo: Any, path: str) -> Any:
    """``repo.resolve`` with symlinks followed in every component, not only the last one
    (``ns/name/prod/model.onnx`` where ``prod`` is an alias)."""
    current = ""
    for part in [p for p in path.split("/") if p]:
        current = repo.resolve(f"{current}/{part}").path
    return repo.resolve(current)


# -- the entry point -------------------------------------------------------------------------------
def _open(uri: CvmfsUri, repo: str | None, key: Any, config_files: Sequence[Any],
          cache: Any, env: Mapping[str, str]) -> Any:  # fmt: skip
    target = repo or uri.fqrn
    if target is None:
        raise ConfigError(f"{uri}: say which repository (cvmfs://<fqrn>/... or --repo)")
    return open_target(target, public_key=key, cache=cache, config_files=config_files, env=env)


def _config(fqrn: str | None, config_files: Sequence[Any], env: Mapping[str, str]) -> Any:
    from cvmfs_ml.client.config import load_config

    try:
        return load_config(fqrn, list(config_files), env)
    except ConfigError:
        return None


def _repo_mount(repo: str | None) -> Path | None:
    """``--repo`` naming a mounted repository itself (``/cvmfs/<fqrn>``)."""
    if repo is None or "://" in repo:
        return None
    point = Path(repo)
    return point if point.is_dir() and os.path.ismount(point) else None


def _repo_name(repo: str | None) -> str | None:
    """The repository name ``repo`` stands for (URL, folder, mount or FQRN), where it says one."""
    if repo is None:
        return None
    mount = _repo_mount(repo)
    name = mount.name if mount is not None else target_fqrn(repo)
    return name if name and _FQRN_RE.fullmatch(name) else None


@dataclass(frozen=True)
class Resolved:
    """Where a reference was found: ``path`` and whether it is inside a mount."""

    path: Path
    mounted: bool
    version: str | None


def locate(
    ref: str | CvmfsUri,
    *,
    repo: str | None = None,
    key: Any = None,
    config_files: Sequence[Any] = (),
    cache: Any = None,
    env: Mapping[str, str] = os.environ,
    use_mount: bool = True,
    dest: Path | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> Resolved:
    """The local folder of ``ref`` (see the module docstring); ``dest`` materialises there
    instead of in the cache's ``materialised/`` folder (and links there from a mount).
    ``warn`` hears of links a copy keeps as they are (:func:`materialise`)."""
    uri = ref if isinstance(ref, CvmfsUri) else parse_ref(ref)
    named = _repo_name(repo)
    if uri.fqrn and named and named != uri.fqrn:  # a mistyped name must not give another model
        raise ConfigError(f"{uri} names repository {uri.fqrn}, but repo {repo} is {named}; "
                          "give the reference as NS/NAME:VERSION or drop the repo")  # fmt: skip
    fqrn = uri.fqrn or (target_fqrn(repo) if repo else None)
    config = _config(fqrn, config_files, env)
    if use_mount:
        roots = mount_roots(env, config.params if config is not None else {})
        mount = _repo_mount(repo) or (mounted_root(fqrn, roots) if fqrn else None)
        if mount is not None:
            try:
                found = resolve_in_mount(mount, uri.path)
            except NotFoundError:
                if uri.model is None:
                    raise
                raise _missing(uri, lambda path: os.listdir(mount / path.lstrip("/")),
                               str(mount)) from None  # fmt: skip
            check_version(uri, str(found.relative_to(os.path.realpath(mount))))
            version = found.name if uri.model is not None else None
            if dest is not None:
                link_tree(found, Path(dest))
                return Resolved(Path(dest), True, version)
            return Resolved(found, True, version)
    # Never a shared folder such as /tmp: a complete copy there is used when the server is not
    # there to check it against.
    base = (config.cache_base if config is not None else default_cache_base(env)) / "materialised"
    known = base / fqrn / uri.path if dest is None and fqrn and uri.model is not None else None
    with contextlib.ExitStack() as stack:
        try:
            repository = stack.enter_context(_open(uri, repo, key, config_files, cache, env))
            entry = repository.resolve(uri.path)
            ident = content_id(repository, entry) if dest is None else ""
        except NotFoundError:
            if uri.model is None:
                raise
            raise _missing(uri, lambda path: [posixpath.basename(e.path)
                                              for e in repository.listdir(path)],
                           repository.fqrn) from None  # fmt: skip
        except (DownloadError, StorageError, OSError) as exc:  # not reached; a repository
            if known is None or not is_complete(known):  # failing its checks is an error
                raise
            (warn or log.warning)(f"could not check {known} against the repository, so it may be "
                                  f"out of date; using it as it is ({exc})")  # fmt: skip
            return Resolved(known, False, known.name)
        if uri.model is not None and not entry.is_dir:
            raise NotFoundError(f"model version {uri}", repository.fqrn)
        check_version(uri, entry.path)
        version = posixpath.basename(entry.path) if uri.model is not None else None
        if dest is not None:
            materialise(repository, entry.path, Path(dest), progress=progress, warn=warn)
            return Resolved(Path(dest), False, version)
        dest = base / repository.fqrn / entry.path.lstrip("/")
        record = record_path(base, repository.fqrn, entry.path)
        if is_complete(dest):
            if recorded(record) == ident:
                return Resolved(dest, False, version)
            # The version was published again with other content (or the copy is older than
            # its record): made again, the old one set aside.
            stack.enter_context(set_aside(dest))
        materialise(repository, entry.path, dest, progress=progress, warn=warn)
        write_record(record, ident)
        return Resolved(dest, False, version)


def _missing(uri: CvmfsUri, listdir: Callable[[str], list[str]], where: str) -> NotFoundError:
    """The error for a model version or alias that is not there, naming those that are."""
    assert uri.model is not None
    try:
        names = listdir(uri.model.model_path)
    except (FileNotFoundError, NotADirectoryError):  # no such model at all
        names = []
    return missing_version(uri.model, names, where)


def resolve(ref: str, **options: Any) -> Path:
    """A local path to the model version ``ref`` names: inside a mount where one exists, else a
    verified copy materialised from the client's cache (see :func:`locate` for ``options``)."""
    return locate(ref, **options).path
