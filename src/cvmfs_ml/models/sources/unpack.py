"""Unpack OCI layers (tarballs, possibly gzip or zstd compressed) into a folder, safely.

Layers come from a registry and are untrusted. Two modes:

* **artifact** (ModelPack, KitOps, ORAS directory layers): the same refusals as
  :func:`cvmfs_ml.publish.sources.scan_tarball` - absolute names, ``..`` components, symlinks that
  are absolute or escape the tree, hard links out of the tree, device files - all raise
  :class:`UnsafeInputError`.
* **rootfs** (container image layers, applied in order as DUCC does): symlink targets are kept as
  they are (they are resolved inside the container, never by us), FIFOs are kept, and OCI
  whiteouts are applied: ``.wh.<name>`` deletes ``<name>`` from the lower layers and
  ``.wh..wh..opq`` empties its directory of lower-layer entries (image-spec ``layer.md``,
  "Whiteouts"). Device files are still refused.

In both modes nothing is ever written *through* a symlink: a member whose parent path is a
symlink on disk is refused, and files are created with ``O_NOFOLLOW`` after removing whatever was
there, so a hostile layer cannot write outside ``dest``. Directory modes and mtimes are applied by
:meth:`TreeWriter.finish`, after every layer, so a read-only directory in a lower layer cannot
block a later one. Sparse members are refused (:mod:`tarfile` would write a hole of a TiB as
zeros, and CernVM-FS cannot store holes), and with a :class:`UnpackBudget` the bytes written are
counted as they are written and held to its limit, as are the tar members.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.cvmfs.catalog import MARKER
from cvmfs_ml.errors import FormatError, UnsafeInputError
from cvmfs_ml.models.sources.decompress import decompressed, open_decompressed, sniff_compression
from cvmfs_ml.models.sources.limits import UnpackBudget

__all__ = [
    "LayerStats",
    "LinkReport",
    "TreeWriter",
    "decompressed",
    "make_readable",
    "materialise_links",
    "open_decompressed",
    "resolve_in_root",
    "safe_relative",
    "sniff_compression",
]

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

_COPY_BUFFER = 1 << 20


def safe_relative(name: str, what: str = "") -> str:
    """``name`` as a normalised relative path, or :class:`UnsafeInputError`.

    ``""`` means the tree's root. Absolute paths and ``..`` components are refused rather than
    stripped: a layer that tries them is hostile or broken, and either way must not be published.
    """
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeInputError(what or name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeInputError(what or name, "'..' in path")
    if any("\x00" in p for p in parts):
        raise UnsafeInputError(what or name, "NUL in path")
    return "/".join(parts)


@dataclass
class LayerStats:
    """What one layer changed: counts, bytes written, whiteouts applied."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    whiteouts: int = 0
    opaque: int = 0


class TreeWriter:
    """Writes layers into ``dest``; call :meth:`finish` once after the last layer.

    ``rootfs=True`` selects container-image semantics (whiteouts, symlinks kept verbatim, FIFOs);
    otherwise artifact semantics (escaping symlinks refused, ``.wh.`` names are ordinary files).
    """

    def __init__(
        self,
        dest: Path,
        *,
        rootfs: bool = False,
        whiteouts: bool = True,
        budget: UnpackBudget | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.budget = budget  # shared by the writers of one image (sync/layers.py has several)
        self._what = "layer"  # the layer being applied, for errors
        self.dest.mkdir(parents=True, exist_ok=True)
        self.rootfs = rootfs
        # False: one layer on its own (DUCC's .layers/), its whiteout files kept as they are.
        self.whiteouts = whiteouts
        self._dir_meta: dict[str, tuple[int, int]] = {}
        self._layer_written: set[str] = set()
        #: rootfs mode: owners other than root, ``{relative path: (uid, gid)}`` from the tar
        #: headers (an unprivileged writer cannot chown; the publisher applies them).
        self.owners: dict[str, tuple[int, int]] = {}

    # -- paths ------------------------------------------------------------------------------------
    def _abs(self, relative: str) -> str:
        # A few calls per member: a str join, not os.path.join's fspath and checks (``relative``
        # is normalised by safe_relative, never absolute).
        root = str(self.dest)
        return f"{root}/{relative}" if relative else root

    def _lstat(self, relative: str) -> os.stat_result | None:
        try:
            return os.lstat(self._abs(relative))
        except FileNotFoundError:
            return None

    def _parents(self, relative: str, member: str, *, create: bool = True) -> bool:
        """Make sure every parent of ``relative`` is a real directory (never a symlink).

        Returns False when ``create`` is off and a parent is missing.
        """
        parts = relative.split("/")[:-1]
        current = ""
        for part in parts:
            current = f"{current}/{part}" if current else part
            st = self._lstat(current)
            if st is None:
                if not create:
                    return False
                os.mkdir(self._abs(current), 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeInputError(member, f"path goes through the symlink {current!r}")
            if not stat.S_ISDIR(st.st_mode):
                if not self.rootfs:
                    raise UnsafeInputError(member, f"{current!r} is a file, not a folder")
                if not create:
                    return False
                os.unlink(self._abs(current))
                os.mkdir(self._abs(current), 0o755)
        return True

    def _remove(self, relative: str) -> None:
        """Delete whatever is at ``relative`` (a directory with all its contents)."""
        st = self._lstat(relative)
        if st is None:
            return
        path = self._abs(relative)
        if stat.S_ISDIR(st.st_mode):
            # Lower layers may have left read-only folders; make them writable to delete (a
            # symlink among them cannot be chmod-ed without following it: NotImplementedError).
            # The same walk names what the tree forgets with the folder: scanning every key
            # of the whole tree instead made each removed folder cost the tree (quadratic).
            gone = [relative]
            for root, dirs, files in os.walk(path):
                base = relative + root[len(path) :]
                for name in dirs:
                    with contextlib.suppress(OSError, NotImplementedError):
                        os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
                gone += [f"{base}/{name}" for name in dirs + files]
            os.chmod(path, 0o700)
            shutil.rmtree(path)
            for key in gone:
                self._dir_meta.pop(key, None)
                self.owners.pop(key, None)
        else:
            os.unlink(path)
            self.owners.pop(relative, None)

    # -- entries ----------------------------------------------------------------------------------
    def write_file(
        self,
        relative: str,
        source: BinaryIO,
        *,
        mode: int = 0o644,
        mtime: float | None = None,
        member: str = "",
    ) -> int:
        """Create ``relative`` with ``source``'s bytes (replacing what was there); bytes written."""
        member = member or relative
        if not relative:
            raise UnsafeInputError(member, "a file cannot replace the tree's root")
        self._parents(relative, member)
        self._remove(relative)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self._abs(relative), flags, 0o600)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                block = source.read(_COPY_BUFFER)
                if not block:
                    break
                if self.budget is not None:
                    self.budget.spend(len(block), self._what, member)
                out.write(block)
                written += len(block)
            os.fchmod(out.fileno(), self._file_mode(mode))
        if mtime is not None:
            os.utime(self._abs(relative), (mtime, mtime), follow_symlinks=False)
        self._layer_written.add(relative)
        return written

    def place_file(
        self,
        relative: str,
        blob: Path,
        *,
        mode: int = 0o644,
        mtime: float | None = None,
        move: bool = False,
        member: str = "",
    ) -> int:
        """Put the file ``blob`` at ``relative``: renamed when ``move`` (no copy), else copied."""
        member = member or relative
        if not relative:
            raise UnsafeInputError(member, "a file cannot replace the tree's root")
        self._parents(relative, member)
        self._remove(relative)
        target = self._abs(relative)
        if move:
            os.replace(blob, target)
        else:
            shutil.copyfile(blob, target)
        os.chmod(target, self._file_mode(mode))
        if mtime is not None:
            os.utime(target, (mtime, mtime))
        self._layer_written.add(relative)
        size = os.path.getsize(target)
        if self.budget is not None:
            self.budget.spend(size, self._what, member)
        return size

    def _file_mode(self, mode: int) -> int:
        # Set-id bits only make sense inside a container image's own tree.
        return mode & (0o7777 if self.rootfs else 0o777)

    def _mkdir(self, relative: str, mode: int, mtime: float, member: str) -> None:
        if relative:
            self._parents(relative, member)
            st = self._lstat(relative)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self._remove(relative)
                st = None
            if st is None:
                os.mkdir(self._abs(relative), 0o755)
        self._dir_meta[relative] = (mode & 0o7777, int(mtime))
        self._layer_written.add(relative)

    def _symlink(self, relative: str, target: str, mtime: float, member: str) -> None:
        if not relative:
            raise UnsafeInputError(member, "a symlink cannot replace the tree's root")
        if not self.rootfs:
            if target.startswith("/"):
                raise UnsafeInputError(member, f"symlink to absolute path {target!r}")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
            if resolved == ".." or resolved.startswith("../"):
                raise UnsafeInputError(member, f"symlink {target!r} escapes the tree")
        self._parents(relative, member)
        self._remove(relative)
        os.symlink(target, self._abs(relative))
        with contextlib.suppress(OSError, NotImplementedError):
            os.utime(self._abs(relative), (mtime, mtime), follow_symlinks=False)
        self._layer_written.add(relative)

    def _hardlink(self, relative: str, linkname: str, mtime: float, member: str) -> None:
        source = safe_relative(linkname, member)
        if not relative or not source:
            raise UnsafeInputError(member, "hard link to or from the tree's root")
        if not self._parents(source, member, create=False):
            raise UnsafeInputError(member, f"hard link to missing {linkname!r}")
        st = self._lstat(source)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise UnsafeInputError(member, f"hard link to {linkname!r}, which is not a file")
        if source == relative:
            return
        self._parents(relative, member)
        self._remove(relative)
        try:
            os.link(self._abs(source), self._abs(relative), follow_symlinks=False)
        except OSError:
            shutil.copy2(self._abs(source), self._abs(relative), follow_symlinks=False)
        self._layer_written.add(relative)

    # -- whiteouts --------------------------------------------------------------------------------
    def _whiteout(self, relative: str, member: str, stats: LayerStats) -> None:
        parent, _, name = relative.rpartition("/")
        if name == OPAQUE_WHITEOUT:
            stats.opaque += 1
            if not self._parents(relative, member, create=False):
                return
            st = self._lstat(parent)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return
            for child in os.listdir(self._abs(parent)):
                child_rel = f"{parent}/{child}" if parent else child
                if child_rel not in self._layer_written:  # only lower layers are hidden
                    self._remove(child_rel)
            return
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...): not content
        stats.whiteouts += 1
        hidden = name[len(WHITEOUT_PREFIX) :]
        if not hidden or hidden in (".", ".."):
            raise UnsafeInputError(member, "whiteout of nothing")
        hidden_rel = f"{parent}/{hidden}" if parent else hidden
        if not self._parents(hidden_rel, member, create=False):
            return
        if hidden_rel not in self._layer_written:
            self._remove(hidden_rel)

    # -- tarballs ---------------------------------------------------------------------------------
    def apply_tar(self, stream: BinaryIO, *, what: str = "layer") -> LayerStats:
        """Apply one (decompressed) tar stream on top of what is already in ``dest``."""
        stats = LayerStats()
        self._layer_written = set()
        self._what = what
        try:
            archive = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 - closed below
        except tarfile.TarError as exc:
            raise FormatError(what, f"not a tar archive: {exc}") from exc
        try:
            # Not ``for member in archive``: a TarFile keeps every member it reads until it is
            # closed (about 500 bytes each: a layer of 10^6 empty files held 660 MB, now 166 MB).
            while (member := archive.next()) is not None:
                archive.members.clear()
                if self.budget is not None:
                    marker = not member.isdir() and posixpath.basename(member.name) == MARKER
                    self.budget.count(self._what, member.name, marker=marker)
                self._apply_member(archive, member, stats)
        except tarfile.TarError as exc:
            raise FormatError(what, f"broken tar archive: {exc}") from exc
        finally:
            archive.close()
        return stats

    def _apply_member(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, stats: LayerStats
    ) -> None:
        name = member.name
        if member.issparse():  # tarfile would write the holes as zeros: 1 KiB may claim a TiB
            raise FormatError(
                self._what,
                f"{name!r} is a sparse file (declaring {member.size} bytes);"
                " CernVM-FS cannot store holes",
            )
        relative = safe_relative(name, name)
        basename = relative.rpartition("/")[2]
        if self.rootfs and self.whiteouts and basename.startswith(WHITEOUT_PREFIX):
            self._whiteout(relative, name, stats)
            return
        if member.ischr() or member.isblk():
            raise UnsafeInputError(name, "device file in layer")
        self._apply_entry(archive, member, relative, stats)
        if self.rootfs and relative:
            if member.uid or member.gid:
                self.owners[relative] = (member.uid, member.gid)
            else:
                self.owners.pop(relative, None)

    def _apply_entry(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        relative: str,
        stats: LayerStats,
    ) -> None:
        name = member.name
        if member.isdir():
            self._mkdir(relative, member.mode, member.mtime, name)
            stats.directories += 1
        elif member.issym():
            self._symlink(relative, member.linkname, member.mtime, name)
            stats.symlinks += 1
        elif member.islnk():
            self._hardlink(relative, member.linkname, member.mtime, name)
            stats.hardlinks += 1
        elif member.isfifo():
            if not self.rootfs:
                raise UnsafeInputError(name, "FIFO in an artifact layer")
            self._parents(relative, name)
            self._remove(relative)
            os.mkfifo(self._abs(relative), member.mode & 0o777)
            self._layer_written.add(relative)
        elif member.isreg():
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - isreg() members always have data
                raise FormatError(name, "no data for a regular file")
            with handle:
                stats.bytes += self.write_file(
                    relative, handle, mode=member.mode, mtime=member.mtime, member=name
                )
            stats.files += 1
        else:
            raise UnsafeInputError(name, f"unsupported tar member type {member.type!r}")

    def apply_blob(self, blob: Path, *, what: str = "layer") -> LayerStats:
        """Apply the layer file ``blob`` (gzip, zstd or plain tar, decided by its bytes)."""
        with open_decompressed(blob) as stream:
            return self.apply_tar(stream, what=what)

    def drop_specials(self) -> list[str]:
        """Remove FIFOs (a model version holds files and folders only); their paths."""
        dropped = []
        for folder, _dirs, files in os.walk(self.dest):
            for name in files:
                path = os.path.join(folder, name)
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    os.unlink(path)
                    dropped.append(os.path.relpath(path, self.dest))
        return sorted(dropped)

    def finish(self) -> None:
        """Apply directory modes and mtimes, deepest first (writing into a folder touches it)."""
        for relative in sorted(self._dir_meta, key=lambda r: r.count("/"), reverse=True):
            mode, mtime = self._dir_meta[relative]
            path = self._abs(relative)
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        self._dir_meta.clear()


def make_readable(root: Path) -> dict[str, int]:
    """Give the owner read (and folder search) access everywhere under ``root``.

    Image layers hold files and folders their owner cannot read (``/etc/shadow`` with mode
    0000, folders 0700 or 0000); an unprivileged publisher must still read them. Returns the
    modes changed, ``{relative path: original mode}``, so they are published as they were.
    """
    changed: dict[str, int] = {}
    root_mode = os.lstat(root).st_mode
    if root_mode & 0o500 != 0o500:
        changed[""] = stat.S_IMODE(root_mode)
        os.chmod(root, stat.S_IMODE(root_mode) | 0o700)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            need = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600 if stat.S_ISREG(st.st_mode) else 0
            if need and st.st_mode & need != need:
                changed[os.path.relpath(path, root)] = stat.S_IMODE(st.st_mode)
                os.chmod(path, stat.S_IMODE(st.st_mode) | need)
    return changed


# -- symlinks of a root filesystem, made publishable as a model version ---------------------------
_MAX_LINK_HOPS = 40  # as the kernel's MAXSYMLINKS


def resolve_in_root(root: Path, relative: str) -> str | None:
    """Where ``relative`` leads inside ``root`` as if ``root`` were ``/`` (``chroot``).

    Absolute targets restart at ``root`` and ``..`` stops at it, as for a process inside the
    container. Returns the resolved relative path, or None when it dangles or loops.
    """
    pending = list(reversed(relative.split("/")))
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = [*resolved, part]
        try:
            st = os.lstat(os.path.join(root, *candidate))
        except OSError:  # missing, or a file used as a folder
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                return None
            target = os.readlink(os.path.join(root, *candidate))
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed(target.split("/")))
            continue
        resolved = candidate
    return "/".join(resolved)


@dataclass
class LinkReport:
    """What :func:`materialise_links` did to the symlinks of a tree."""

    files: int = 0  # replaced by the file they point to
    folders: int = 0  # rewritten as relative links inside the tree
    dropped: list[str] | None = None  # dangling, looping or leaving the tree: removed

    def to_json(self) -> dict[str, Any]:
        dropped = self.dropped or []
        return {
            "as_files": self.files,
            "as_folders": self.folders,
            "dropped": len(dropped),
            "dropped_paths": dropped[:50],
        }


def materialise_links(root: Path, subtree: str = "") -> LinkReport:
    """Make the symlinks under ``root/subtree`` publishable as a model version.

    A model version holds plain files (symlinks are resolved by the publisher and may not leave
    the version), while an image's root filesystem is full of absolute links. Each link is
    resolved inside ``root`` (:func:`resolve_in_root`): a file target replaces the link (hard
    link, so no copy); a folder target inside ``subtree`` becomes a relative link the publisher
    follows; a link that dangles (``/proc/...``), loops (``X11 -> .``) or leaves ``subtree`` is
    removed and reported.
    """
    report = LinkReport(dropped=[])
    assert report.dropped is not None
    base = os.path.join(root, subtree) if subtree else str(root)
    links = []
    for folder, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                links.append(os.path.relpath(path, root))
    prefix = subtree.strip("/")
    for link in sorted(links):
        target = resolve_in_root(root, link)
        path = os.path.join(root, link)
        parent = posixpath.dirname(link)
        st = os.lstat(os.path.join(root, target)) if target is not None else None
        if st is not None and stat.S_ISREG(st.st_mode):
            os.unlink(path)
            try:
                os.link(os.path.join(root, target), path)  # type: ignore[arg-type]
            except OSError:
                shutil.copy2(os.path.join(root, target), path)  # type: ignore[arg-type]
            report.files += 1
            continue
        inside = target is not None and (
            not prefix or target == prefix or target.startswith(prefix + "/")
        )
        loops = target is not None and (
            target == "" or parent == target or parent.startswith(target + "/")
        )
        if st is not None and stat.S_ISDIR(st.st_mode) and inside and not loops:
            os.unlink(path)
            os.symlink(posixpath.relpath(target, parent or "."), path)  # type: ignore[arg-type]
            report.folders += 1
            continue
        os.unlink(path)
        report.dropped.append(link)
    return report
