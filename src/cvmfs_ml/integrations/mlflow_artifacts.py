"""MLflow artifact repository for ``cvmfs://`` URIs (read-only).

Registered through MLflow's ``mlflow.artifact_repository`` entry point (``cvmfs = ...``), so
``mlflow.pyfunc.load_model("cvmfs://<fqrn>/<ns>/<name>/<version>")`` and ``mlflow artifacts
download -u cvmfs://...`` read a model published with ``cvmfs-ml model publish``. A path
component ``<name>:<alias>`` means the alias folder ``<name>/<alias>``, so
``cvmfs://<fqrn>/hep/tagger:prod`` works as it does for ``model get``.

Where ``/cvmfs/<fqrn>`` (or ``CVMFS_MOUNT_DIR/<fqrn>``) is mounted, files are read from the
mount; otherwise through the client, configured the usual way (``CVMFS_ML_CONFIG``,
``CVMFS_SERVER_URL``, keys and cache from the environment), every object verified against its
hash. Writing (``log_artifact``) is refused: repositories are published with ``cvmfs-ml``.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import threading
from pathlib import Path
from typing import Any

from mlflow.entities import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repo import ArtifactRepository

from cvmfs_ml.cvmfs.catalog import MARKER
from cvmfs_ml.errors import CvmfsMlError, UnsafeInputError
from cvmfs_ml.models.refs import (
    SCHEME,
    mount_roots,
    mounted_root,
    parse_uri,
    resolve_in_mount,
    resolve_path,
)

__all__ = ["CvmfsArtifactRepository"]

_COPY_BLOCK = 8 * 2**20

log = logging.getLogger(__name__)


def _alias_path(path: str) -> str:
    """``ns/name:alias/rest`` -> ``ns/name/alias/rest`` (the first ``:`` of each component)."""
    return "/".join(part.replace(":", "/", 1) for part in path.split("/") if part)


class CvmfsArtifactRepository(ArtifactRepository):
    """Artifacts under ``cvmfs://<fqrn>/<path>``, read from a mount or through the client."""

    def __init__(
        self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
    ) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        head, _, rest = artifact_uri.rstrip("/").partition(SCHEME)[2].partition("/")
        try:
            uri = parse_uri(f"{SCHEME}{head}/{_alias_path(rest)}")
        except UnsafeInputError as exc:
            raise MlflowException(str(exc)) from exc
        assert uri.fqrn is not None  # parse_uri requires cvmfs://<fqrn>
        self.fqrn = uri.fqrn
        self.base = uri.path
        self._mount = mounted_root(self.fqrn, mount_roots())
        self._repository: Any = None
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------
    def _rel(self, path: str | None) -> str:
        """The repository path of ``path`` (relative to the artifact root), traversal refused."""
        extra = _alias_path(path or "")
        if any(part in (".", "..") for part in extra.split("/")):
            raise MlflowException(f"refusing artifact path {path!r}: '.' and '..' are not allowed")
        return posixpath.join(self.base, extra).strip("/") if extra else self.base

    def _client(self) -> Any:
        with self._lock:
            if self._repository is None:
                from cvmfs_ml.client.locate import open_target

                self._repository = open_target(self.fqrn)
            return self._repository

    def _local(self, rel: str) -> Path:
        assert self._mount is not None
        return resolve_in_mount(self._mount, rel)

    def list_artifacts(self, path: str | None = None) -> list[FileInfo]:
        rel = self._rel(path)
        prefix = (path or "").strip("/")
        try:
            if self._mount is not None:
                folder = self._local(rel)
                if not folder.is_dir():
                    return []
                items = [item for e in folder.iterdir()
                         if (item := self._mounted(rel, e.name)) is not None]  # fmt: skip
            else:
                repo = self._client()
                top = resolve_path(repo, rel)
                if not top.is_dir:
                    return []
                items = [item for entry in repo.listdir(top.path)
                         if (item := self._entry(repo, entry)) is not None]  # fmt: skip
        except FileNotFoundError:
            return []
        except CvmfsMlError as exc:
            raise MlflowException(f"{SCHEME}{self.fqrn}/{rel}: {exc}") from exc
        return [
            FileInfo(
                posixpath.join(prefix, name) if prefix else name, is_dir, None if is_dir else size
            )
            for name, is_dir, size in sorted(items)
            if name != MARKER
        ]

    # Links left out of a listing, as kserve-init does not follow them in a copy: one to nothing
    # or out of the repository (MLflow would fail the whole download on it), and one to a
    # folder (MLflow downloads a listed folder whole: '../..' is the repository, '.' a loop).
    def _mounted(self, rel: str, name: str) -> tuple[str, bool, int] | None:
        path = posixpath.join(rel, name)
        try:
            target = self._local(path)
            if target.is_dir() and os.path.islink(self._local(rel) / name):
                raise IsADirectoryError(errno.EISDIR, "a link to a folder", name)
            return name, target.is_dir(), target.stat().st_size
        except (CvmfsMlError, OSError) as exc:
            log.warning("%s%s/%s: left out: %s", SCHEME, self.fqrn, path, exc)
            return None

    def _entry(self, repo: Any, entry: Any) -> tuple[str, bool, int] | None:
        try:
            target = repo.resolve(entry.path) if entry.is_symlink else entry
            if entry.is_symlink and target.is_dir:
                raise IsADirectoryError(errno.EISDIR, "a link to a folder", entry.path)
        except (CvmfsMlError, OSError) as exc:  # NotFoundError and UnsafeInputError are ours
            log.warning("%s%s%s: left out: %s", SCHEME, self.fqrn, entry.path, exc)
            return None
        return posixpath.basename(entry.path), target.is_dir, target.size

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        rel = self._rel(remote_file_path)
        try:
            if self._mount is not None:
                shutil.copyfile(self._local(rel), local_path)
                return
            repo = self._client()
            with repo.open_file(resolve_path(repo, rel).path) as src, open(local_path, "wb") as out:
                while block := src.read(_COPY_BLOCK):
                    out.write(block)
        except (CvmfsMlError, OSError) as exc:
            raise MlflowException(f"{SCHEME}{self.fqrn}/{rel}: {exc}") from exc

    # -- writing is the publisher's job -------------------------------------------------------
    def _read_only(self, *_: Any, **__: Any) -> None:
        raise MlflowException(
            f"{SCHEME} artifact stores are read-only; publish with `cvmfs-ml model publish`"
        )

    log_artifact = _read_only
    log_artifacts = _read_only
    delete_artifacts = _read_only

    def __del__(self) -> None:
        repository = getattr(self, "_repository", None)
        if repository is not None:
            repository.close()
