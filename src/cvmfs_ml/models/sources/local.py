"""A local file or folder as the content of a model version.

A model version holds plain files only: symlinks in the source are resolved to the content they
point to (a Hugging Face snapshot is nothing but symlinks into ``blobs/``), so the published
version reads the same with any client and never points outside itself. Resolution is bounded:
a symlink whose target leaves ``bound`` (by default the source folder) is refused, because a
publisher fed an uploaded folder must not publish ``/etc/shadow`` through a link.

Every file is hashed with SHA-256 once, in parallel (``hashlib`` releases the GIL), before the
repository lock is taken; those digests go into ``model.json`` and decide whether re-publishing
a version is a no-op or a conflict.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.cvmfs.catalog import MARKER
from cvmfs_ml.errors import NotFoundError, PublishError, UnsafeInputError
from cvmfs_ml.models.sources.limits import MAX_CATALOGS

__all__ = [
    "MAX_ENTRIES",
    "SKIPPED_NAMES",
    "SourceFile",
    "SourceTree",
    "cut_value",
    "describe_local",
    "detect_license",
    "hash_tree",
    "open_regular",
    "read_model_card",
    "scan_source",
    "stamp_of",
    "text_head",
]

#: Entries never published from a folder: version-control and tool caches (``hf download
#: --local-dir`` keeps its bookkeeping in ``.cache/huggingface``), not model content.
SKIPPED_NAMES = frozenset({".git", ".cache", ".hg", ".svn", "__pycache__", ".DS_Store"})

_BLOCK = 1 << 20

MAX_ENTRIES = 200_000
"""Files and folders a source may hold once its links are followed: a ``model.json`` lists at
most about 100,000 files (16 MiB), and links to folders fan out (six levels of ten links each
are a million paths in a few kB of folder)."""


@dataclass(frozen=True)
class SourceFile:
    """A regular file to publish at ``path`` (``/``-separated, relative to the version).

    ``stamp`` is what the file was when it was hashed (:func:`stamp_of`): the publisher's read
    of it must find the same (:func:`open_regular`), or the bytes it stores would not be those
    whose ``sha256`` ``model.json`` records."""

    path: str
    real: Path
    size: int
    mode: int
    mtime: int
    sha256: str = ""
    stamp: tuple[int, int, int, int, int] | None = None


@dataclass
class SourceTree:
    """What a source holds once symlinks are resolved: directories (parents first) and files."""

    root: Path
    files: list[SourceFile] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def digests(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files}


def _inside(path: Path, bound: Path) -> bool:
    return path == bound or path.is_relative_to(bound)


def _resolve(link: Path, bound: Path, rel: str) -> Path:
    try:
        real = link.resolve(strict=True)
    except FileNotFoundError as exc:
        raise UnsafeInputError(rel, f"dangling symlink -> {os.readlink(link)!r}") from exc
    except (RuntimeError, OSError) as exc:  # ELOOP
        raise UnsafeInputError(rel, f"symlink cannot be resolved: {exc}") from exc
    if not _inside(real, bound):
        raise UnsafeInputError(
            rel, f"symlink points outside {bound} (to {real}); copy the file into the source"
        )
    return real


def scan_source(
    src: Path, *, bound: Path | None = None, max_catalogs: int = MAX_CATALOGS
) -> SourceTree:
    """List a file or folder, resolving symlinks to their content.

    A single file is published under its own name. In a folder, hidden tool folders
    (:data:`SKIPPED_NAMES`) are skipped; symlinks must resolve inside ``bound`` (default: the
    folder itself; the ``models--*`` folder for a Hugging Face snapshot); special files and
    symlink cycles are refused with :class:`UnsafeInputError`, more than :data:`MAX_ENTRIES`
    files and folders with :class:`PublishError`. A ``.cvmfscatalog`` file below
    the top makes its folder a nested catalog when published: more than ``max_catalogs`` of
    them are refused with :class:`PublishError` (the bound images and tarballs have).
    """
    src = Path(src)
    if not os.path.lexists(src):
        raise NotFoundError(str(src), "model source")
    real_root = src.resolve(strict=True)
    bound = Path(bound).resolve() if bound is not None else real_root
    if real_root.is_file():
        st = real_root.stat()
        _check_name(src.name)
        single = SourceFile(src.name, real_root, st.st_size, st.st_mode, int(st.st_mtime))
        return SourceTree(src, [single], [])
    if not real_root.is_dir():
        raise UnsafeInputError(str(src), "neither a regular file nor a folder")
    tree = SourceTree(src)
    markers = 0
    for count, (rel, real, st) in enumerate(_walk(real_root, bound), 1):
        if count > MAX_ENTRIES:
            raise PublishError(
                f"{src} holds more than {MAX_ENTRIES} files and folders (links followed; at"
                f" {rel!r}), more than one model version's model.json can list"
            )
        if stat.S_ISDIR(st.st_mode):
            tree.dirs.append(rel)
        else:
            if rel.endswith("/" + MARKER):
                markers += 1
                if markers > max_catalogs:
                    raise PublishError(
                        f"{src} holds more than {max_catalogs} {MARKER} files (at {rel!r}): each"
                        f" makes its folder a nested catalog, and one model version may have"
                        f" {max_catalogs} (the limit for images and uploads too)"
                    )
            tree.files.append(SourceFile(rel, real, st.st_size, st.st_mode, int(st.st_mtime)))
    tree.files.sort(key=lambda f: f.path)
    return tree


def _walk(root: Path, bound: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Depth-first, names sorted, directories before their contents; symlinks followed."""
    stack: list[tuple[Path, str, frozenset[Path]]] = [(root, "", frozenset({root}))]
    while stack:
        folder, prefix, ancestors = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        below = []
        for entry in entries:
            if entry.name in SKIPPED_NAMES:
                continue
            rel = f"{prefix}{entry.name}"
            _check_name(rel)
            path = Path(entry.path)
            real = _resolve(path, bound, rel) if entry.is_symlink() else path
            st = real.stat()
            if stat.S_ISDIR(st.st_mode):
                if real in ancestors:
                    raise UnsafeInputError(rel, "symlink cycle")
                yield rel, real, st
                below.append((real, f"{rel}/", ancestors | {real}))
            elif stat.S_ISREG(st.st_mode):
                yield rel, real, st
            else:
                raise UnsafeInputError(rel, "special file (device, FIFO or socket)")
        stack.extend(reversed(below))


def stamp_of(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells a file rewritten from the one seen before: device, inode, size, modification
    and change times (a write, a truncation, ``touch`` or ``utime`` all move the change time)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Stamped(io.FileIO):
    """A file that must still be ``stamp`` when it is closed (read whole by then)."""

    def __init__(self, fd: int, what: str, stamp: tuple[int, int, int, int, int]) -> None:
        super().__init__(fd, "rb", closefd=True)
        self._what, self._stamp = what, stamp

    def close(self) -> None:
        if self.closed:
            return
        try:
            changed = stamp_of(os.fstat(self.fileno())) != self._stamp
        finally:
            super().close()
        if changed:
            raise _changed(self._what)


def _changed(what: str) -> PublishError:
    return PublishError(
        f"{what!r} changed after it was hashed (rewritten while publishing?): its bytes would not"
        " be the ones model.json records; publish again once the folder is left alone"
    )


def open_regular(
    path: Path,
    what: str,
    buffering: int = -1,
    stamp: tuple[int, int, int, int, int] | None = None,
) -> BinaryIO:
    """``path`` opened for reading, refused (:class:`UnsafeInputError` naming ``what``) unless
    it is a regular file now: one replaced by a FIFO or a device after the scan (a folder others
    write into) is never waited on, as a plain ``open`` waits for a FIFO's writer for ever.

    With ``stamp`` (:func:`stamp_of` when it was hashed) it must still be that file, when opened
    and when closed, else :class:`PublishError`; the handle is then unbuffered."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInputError(what, "not a regular file any more (changed after the scan)")
        os.set_blocking(fd, True)
        if stamp is not None:
            if stamp_of(st) != stamp:
                raise _changed(what)
            return _Stamped(fd, what, stamp)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _check_name(rel: str) -> None:
    """Refuse a name that is not UTF-8 (its bytes come as lone surrogates), shown byte by byte:
    ``model.json`` would hold it as ``"\\udcff"``, which JSON readers but Python's refuse."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = repr(rel.encode("utf-8", "surrogateescape"))  # b'\xff...'
        raise PublishError(
            f"refusing {shown}: the name is not UTF-8 text, which model.json cannot hold;"
            " rename it"
        ) from None


def _sha256(file: SourceFile) -> SourceFile:
    digest = hashlib.sha256()
    done = 0
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open_regular(file.real, file.path, buffering=0) as handle:
        before = stamp_of(os.fstat(handle.fileno()))
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            done += n
        after = stamp_of(os.fstat(handle.fileno()))
    if done != file.size or before != after:
        raise PublishError(f"{file.path} changed while being read ({file.size} -> {done} bytes)")
    return replace(file, sha256=digest.hexdigest(), stamp=after)


def hash_tree(
    tree: SourceTree, *, workers: int = 4, known: Mapping[str, str] | None = None
) -> SourceTree:
    """``tree`` with the SHA-256 of every file filled in (files hashed in parallel).

    ``known`` gives the SHA-256 of files (by path) whose bytes were already verified against
    it, e.g. a registry blob moved into place as the file: they are not read again.
    """
    if not tree.files:
        return tree
    known = known or {}
    todo = [f for f in tree.files if f.path not in known]
    with ThreadPoolExecutor(max(1, min(workers, len(todo) or 1))) as pool:
        hashed = {f.path: f for f in pool.map(_sha256, todo)}
    files = [hashed.get(f.path) or replace(f, sha256=known[f.path]) for f in tree.files]
    return replace(tree, files=files)


# -- what the folder says about itself -------------------------------------------------------
# Bounds on what a folder says about itself, which ends up in model.json and in the index every
# later listing reads: a 300 MB README took 5 GB to split into lines, and a licence string of
# 50 MB made /.cvmfs-ml/index.json 150 MB.
MAX_CARD_BYTES = 256 << 10
"""How much of README.md is read for its front matter (which comes first)."""
MAX_CONFIG_BYTES = 4 << 20
"""A config.json larger than this is not read for a licence."""
MAX_VALUE_CHARS = 256
"""A model card value or licence longer than this is cut (with an ellipsis)."""
MAX_LIST_ITEMS = 64
"""A model card list (tags, base_model...) keeps this many items."""


def text_head(path: Path, limit: int) -> str | None:
    """The first ``limit`` bytes of ``path`` as text (None if it does not open)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def cut_value(text: str) -> str:
    """``text``, cut at :data:`MAX_VALUE_CHARS` (with an ellipsis)."""
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def read_model_card(folder: Path) -> dict[str, Any]:
    """Top-level keys of the YAML front matter of ``folder/README.md`` (a Hugging Face model
    card): scalars and ``- item`` lists only, which is all we read (license, tags...), within
    :data:`MAX_CARD_BYTES`, values cut at :data:`MAX_VALUE_CHARS`, lists at
    :data:`MAX_LIST_ITEMS`."""
    text = text_head(Path(folder) / "README.md", MAX_CARD_BYTES)
    if text is None:
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out: dict[str, Any] = {}
    key: str | None = None
    for line in lines[1:]:
        if line.strip() == "---":
            return out
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith((" ", "\t", "-")):
            item = line.strip()
            listed = out.get(key) if key is not None else None
            if item.startswith("- ") and isinstance(listed, list) and len(listed) < MAX_LIST_ITEMS:
                listed.append(_scalar(item[2:]))
            continue
        name, sep, value = line.partition(":")
        if not sep:
            key = None
            continue
        key = name.strip()
        out[key] = _scalar(value) if value.strip() else []
    return {}  # no closing '---': not front matter


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return cut_value(text)


def detect_license(folder: Path) -> str | None:
    """The license a folder declares: model card ``license`` (``license_name`` when it says
    ``other``), else a ``license`` string in ``config.json``; None if neither says."""
    card = read_model_card(folder)
    value = card.get("license")
    if isinstance(value, list):
        value = cut_value(", ".join(str(v) for v in value)) or None
    if value == "other" and isinstance(card.get("license_name"), str):
        value = card["license_name"]
    if isinstance(value, str) and value:
        return value
    path = Path(folder) / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        config = jsontext.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    found = config.get("license") if isinstance(config, dict) else None
    return cut_value(found) if isinstance(found, str) and found else None


def describe_local(src: Path) -> dict[str, Any]:
    """``source`` of ``model.json`` for a local file or folder."""
    path = Path(src).absolute()
    return {"type": "local", "path": str(path), "kind": "file" if path.is_file() else "folder"}
