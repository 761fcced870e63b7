"""``repo check``: is a repository whole and consistent? (upstream's ``cvmfs_server check``).

Checks, for the current revision and every tagged one: signatures and whitelist (done by opening
the repository), every catalog's hash, counters (``self_*`` recounted from rows, ``subtree_*``
summed from children), nested references (mount point rows 3 vs 33 with equal metadata,
``root_prefix``, uncompressed sizes), chunk lists tiling their files, and every referenced data
object present with the right hash and the right decompressed size. Problems are collected, not
raised, so one run reports them all.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.catalog import MARKER, Catalog, DirectoryEntry, Flag, sized_objects, totals
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import MAX_UNSIZED_OBJECT, ObjectKind, object_path
from cvmfs_ml.errors import CvmfsMlError

__all__ = ["CheckReport", "check_repository"]


@dataclass
class CheckReport:
    catalogs: int = 0
    objects: int = 0
    bytes_checked: int = 0
    revisions: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _CountingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        self.count += len(data)
        return len(data)

    # a fetch that fails over rewinds its output: counting starts again
    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def seek(self, offset: int, whence: int = 0) -> int:
        self.count = offset if whence == 0 else self.count + offset
        return self.count

    def truncate(self, size: int | None = None) -> int:
        return self.count if size is None else size


def _comparable(entry: DirectoryEntry) -> DirectoryEntry:
    mask = ~(Flag.NESTED_MOUNTPOINT | Flag.NESTED_ROOT)
    return replace(entry, flags=entry.flags & mask)


def check_repository(repo: Repository, *, data: bool = True, tags: bool = True) -> CheckReport:
    """Check ``repo`` (already opened, so signatures verified) and return what was found."""
    report = CheckReport()
    source = repo.source
    roots: dict[Digest, int] = {repo.root_hash: repo.manifest.revision}
    if tags:
        try:
            for tag in repo.tags():
                roots.setdefault(tag.root_catalog, tag.revision)
        except CvmfsMlError as exc:
            report.problems.append(f"history: {exc}")
    for extra, kind in ((repo.manifest.metainfo, ObjectKind.METAINFO),):
        if extra is not None:
            _check_object(report, source, extra, kind, True, bound=MAX_UNSIZED_OBJECT)
    seen_catalogs: set[Digest] = set()
    seen_objects: set[Digest] = set()
    for root, revision in roots.items():
        report.revisions.append(revision)
        _check_tree(report, repo, root, seen_catalogs, seen_objects, data)
    return report


def _check_tree(
    report: CheckReport,
    repo: Repository,
    root: Digest,
    seen_catalogs: set[Digest],
    seen_objects: set[Digest],
    data: bool,
) -> None:
    stack: list[tuple[str, Digest, int | None]] = [("", root, None)]
    while stack:
        mountpoint, digest, expected_size = stack.pop()
        if digest in seen_catalogs:
            continue
        seen_catalogs.add(digest)
        try:
            catalog = repo.load_catalog(mountpoint, digest)
        except CvmfsMlError as exc:
            report.problems.append(f"catalog {digest.hex} ({mountpoint or '/'}): {exc}")
            continue
        report.catalogs += 1
        where = f"catalog {digest.hex} ({mountpoint or '/'})"
        if expected_size is not None and catalog.file.stat().st_size != expected_size:
            report.problems.append(
                f"{where}: size {catalog.file.stat().st_size} != {expected_size} in its parent"
            )
        # A hostile catalog (rows a walk cannot follow, a bad nested reference) is a problem
        # of the report, and each step that can still run does: one run reports them all.
        stored: dict[str, int] | None = None
        try:
            stored = _check_counters(report, catalog, where)
        except CvmfsMlError as exc:
            _problem(report, where, exc)
        try:
            _check_nested(report, repo, catalog, stored, where)
        except CvmfsMlError as exc:
            _problem(report, where, exc)
        try:
            if stored is not None:  # else the same walk fails the same way
                _check_entries(report, catalog, mountpoint, where)
            if data:
                for obj, is_chunk, compressed, size in sized_objects(catalog):
                    if obj in seen_objects:
                        continue
                    seen_objects.add(obj)
                    kind = ObjectKind.PARTIAL if is_chunk else ObjectKind.FILE
                    _check_object(report, repo.source, obj, kind, compressed, size)
            stack.extend((r.path, r.digest, r.size) for r in catalog.nested_catalogs())
        except CvmfsMlError as exc:
            _problem(report, where, exc)


def _problem(report: CheckReport, where: str, exc: CvmfsMlError) -> None:
    """Report ``exc`` about the catalog ``where`` once (its text may already name it)."""
    text = str(exc)
    problem = text if text.startswith(where) else f"{where}: {text}"
    if problem not in report.problems:
        report.problems.append(problem)


def _check_entries(report: CheckReport, catalog: Catalog, mountpoint: str, where: str) -> None:
    for entry in catalog.entries():
        if entry.name == MARKER and entry.path != f"{mountpoint}/{MARKER}":
            # swissknife_check.cc: a marker makes its directory a catalog root; one
            # anywhere else means a nested catalog the publisher failed to create.
            report.problems.append(
                f"{where}: {entry.path} is a .cvmfscatalog marker not at a catalog root"
            )
        if entry.is_chunked:
            try:
                catalog.chunks(entry)
            except CvmfsMlError as exc:
                report.problems.append(f"{where}: {exc}")
        elif entry.is_regular and entry.digest is None:
            report.problems.append(f"{where}: {entry.path} has neither hash nor chunks")


def _check_object(
    report: CheckReport,
    source: object,
    digest: Digest,
    kind: ObjectKind,
    compressed: bool,
    size: int | None = None,
    *,
    bound: int | None = None,
) -> None:
    """Fetch (hash-checked, inflated when compressed, bounded by the catalog's ``size``, or
    by ``bound`` for an object no catalog sizes) and count one object, or report it."""
    sink = _CountingSink()
    rel = object_path(digest, kind)
    limit = size if size is not None else bound
    try:
        source.fetch_into(rel, digest, compressed, sink, max_bytes=limit)  # type: ignore[attr-defined]
    except (CvmfsMlError, OSError) as exc:
        report.problems.append(f"object {rel}: {exc}")
        return
    if size is not None and sink.count != size:
        report.problems.append(f"object {rel}: holds {sink.count} bytes, the catalog says {size}")
        return
    report.objects += 1
    report.bytes_checked += sink.count


def _check_counters(report: CheckReport, catalog: Catalog, where: str) -> dict[str, int]:
    """Check the catalog's own counters against its rows; returns the stored counters."""
    stored = catalog.statistics()
    recount = _self_counters(catalog)
    walked = sum(1 for _ in catalog.entries())
    if catalog.row_count() != walked:
        report.problems.append(f"{where}: {catalog.row_count() - walked} rows have no parent")
    for key, value in recount.items():
        if stored.get(key, 0) != value:
            report.problems.append(f"{where}: {key} is {stored.get(key, 0)}, rows say {value}")
    return stored


def _self_counters(catalog: Catalog) -> dict[str, int]:
    counts = dict.fromkeys(
        (
            "self_regular",
            "self_file_size",
            "self_symlink",
            "self_special",
            "self_dir",
            "self_nested",
            "self_chunked",
            "self_chunked_size",
            "self_xattr",
            "self_external",
            "self_external_file_size",
        ),
        0,
    )
    for entry in catalog.entries():
        flags = entry.flags
        if flags & Flag.DIR:
            counts["self_dir"] += 1
        if flags & Flag.NESTED_MOUNTPOINT:
            counts["self_nested"] += 1
        if flags & Flag.LINK:
            counts["self_symlink"] += 1
        elif flags & Flag.SPECIAL:
            counts["self_special"] += 1
        elif flags & Flag.FILE:
            counts["self_regular"] += 1
            counts["self_file_size"] += entry.size
        if flags & Flag.CHUNKED:
            counts["self_chunked"] += 1
            counts["self_chunked_size"] += entry.size
        if entry.xattrs:
            counts["self_xattr"] += 1
        if flags & Flag.EXTERNAL:
            counts["self_external"] += 1
            counts["self_external_file_size"] += entry.size
    counts["self_chunks"] = catalog.chunk_count()
    return counts


def _check_nested(
    report: CheckReport,
    repo: Repository,
    catalog: Catalog,
    stored: dict[str, int] | None,
    where: str,
) -> None:
    """Each nested catalog's mount point row against the child's root row, and the subtree
    counters against the children's sums: one visit per child (with thousands of children, a
    visit for each check reopened each child's connection twice)."""
    expected: dict[str, int] = {}
    for ref in catalog.nested_catalogs():
        mount_row = catalog.lookup(ref.path)
        try:
            child = repo.load_catalog(ref.path, ref.digest)
        except CvmfsMlError:
            child = None  # reported when the child itself is checked
        if child is not None:
            for key, value in totals(child.statistics()).items():
                expected[key] = expected.get(key, 0) + value
        if mount_row is None or not mount_row.flags & Flag.NESTED_MOUNTPOINT:
            report.problems.append(f"{where}: {ref.path} is not a nested mount point row")
            continue
        if child is None:
            continue
        child_root = child.lookup(ref.path)
        if child_root is None or not child_root.flags & Flag.NESTED_ROOT:
            report.problems.append(f"{where}: nested catalog {ref.path} has no root row (33)")
            continue
        if _comparable(child_root) != _comparable(mount_row):
            report.problems.append(f"{where}: {ref.path} differs between parent and child rows")
    for key, value in expected.items():
        if stored is not None and stored.get(key, 0) != value:
            report.problems.append(f"{where}: {key} is {stored.get(key, 0)}, children sum {value}")
