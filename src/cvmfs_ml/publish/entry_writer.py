"""The entries of one source, written into the workspace as their content settles.

Rows go in in the order the source gives them (parents first), each once its content is
stored, so a publish holds only the entries still being stored: at most :data:`MAX_UNSETTLED`,
past which the reader waits for the oldest. When every row waited for the last file, a publish
held about 1.1 KB per entry until the end (200,000 small files: 250 MB).

What a later entry can change about an earlier one is settled as it comes:

* a ``.cvmfscatalog`` marker makes its directory a nested catalog when the marker's row is
  written (:meth:`TreeEditor.make_catalog_root`; the rows already below it move along, which in
  a folder walk are only the names that sort before the marker);
* a hard link takes its content from its leader's row, which was written before it;
* ``/.cvmfsdirtab`` (read as soon as it comes) makes each directory it selects a nested catalog:
  directly when the directory comes after it, by a split at the end when before, and upstream's
  empty marker is put in each such directory (and in a source added as a nested catalog) that
  has none.
"""

from __future__ import annotations

import io
import stat
from collections import deque

from cvmfs_ml.cvmfs.catalog import MARKER, parent_path
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.dirtab import Dirtab
from cvmfs_ml.publish.ingest import ContentPipeline, FileContent, PendingFile
from cvmfs_ml.publish.sources import SourceItem
from cvmfs_ml.publish.tree import TreeEditor, lookup

__all__ = ["DIRTAB", "MAX_UNSETTLED", "EntryWriter"]

DIRTAB = "/.cvmfsdirtab"
MAX_UNSETTLED = 4096
WRITE_BATCH = 512  # rows are written in runs: one clock reading and one GIL hand-over per run


class EntryWriter:
    """Feeds one source's items to the pipeline (:meth:`add`) and writes their rows in order;
    :meth:`finish` writes the rest."""

    def __init__(
        self, editor: TreeEditor, pipeline: ContentPipeline, base: str, nested_root: bool
    ) -> None:
        self.editor = editor
        self.pipeline = pipeline
        self.dirtab: Dirtab | None = None
        self._unsettled: deque[tuple[SourceItem, PendingFile | None]] = deque()
        self._root = base if nested_root and base else None  # added as a nested catalog
        # Directories to make nested catalogs at the end (split off, or already made so).
        self._nested: list[str] = [base] if self._root is not None else []
        # Directories written before a dirtab was read; only a source at the root can hold one.
        self._before_dirtab: list[str] | None = [] if base == "" else None

    def add(self, item: SourceItem) -> None:
        pending = None
        if item.path.endswith("/" + MARKER) and item.is_regular and parent_path(item.path) == "":
            raise PublishError("a .cvmfscatalog marker in the repository root is not allowed")
        if item.is_regular and not item.same_as:
            if item.path == DIRTAB:
                self.dirtab = _read_dirtab(item)
            pending = self.pipeline.add(item)
            item.open = item.file_key = None  # read: its opener (a closure) is not needed
        self._unsettled.append((item, pending))
        if len(self._unsettled) >= WRITE_BATCH:
            self._write_settled(wait_all=False)

    def finish(self) -> None:
        """Write the rest (waiting for their content), then make the nested catalogs that a
        dirtab or the source's ``nested_root`` ask for, each with a marker."""
        self._write_settled(wait_all=True)
        if self.dirtab is not None:
            self._nested += [d for d in self._before_dirtab or () if self.dirtab.matches(d)]
        with self.pipeline.stats.stages.measure("catalog"):
            for path in self._nested:
                self.editor.make_catalog_root(path)  # nothing to do when made so already
                self._put_marker_if_missing(path)

    def _write_settled(self, *, wait_all: bool) -> None:
        """Write the rows at the front whose content is stored; wait for the oldest while more
        than :data:`MAX_UNSETTLED` are held, or for every one with ``wait_all``."""
        unsettled, stages = self._unsettled, self.pipeline.stats.stages
        while unsettled:
            if _settled(unsettled[0]):
                with stages.measure("catalog"):
                    while unsettled and _settled(unsettled[0]):
                        self._put(*unsettled.popleft())
            if not unsettled or not (wait_all or len(unsettled) > MAX_UNSETTLED):
                return
            pending = unsettled[0][1]
            assert pending is not None
            with stages.measure("wait_workers"):
                pending.result()

    def _put(self, item: SourceItem, pending: PendingFile | None) -> None:
        editor, path = self.editor, item.path
        content: FileContent | None = None
        if item.same_as:
            content = editor.content_of(item.same_as, path)
        elif pending is not None:
            content = pending.result()
        if item.is_regular and path.endswith("/" + MARKER):
            editor.ensure_parents(path)
            editor.make_catalog_root(parent_path(path))
        nested = item.is_dir and path == self._root
        if item.is_dir and path and not nested:
            if self.dirtab is not None:
                if self.dirtab.matches(path):
                    nested = True
                    self._nested.append(path)
            elif self._before_dirtab is not None:
                self._before_dirtab.append(path)
        editor.put(item, None, nested_root=nested, content=content)

    def _put_marker_if_missing(self, directory: str) -> None:
        """Upstream's empty ``.cvmfscatalog`` in a directory nested by configuration."""
        path = f"{directory}/{MARKER}"
        if lookup(self.editor.workspace, path) is not None:
            return
        folder = lookup(self.editor.workspace, directory)
        marker = SourceItem(
            path=path,
            mode=stat.S_IFREG | 0o644,
            mtime=folder.mtime if folder is not None else 0,
            size=0,
            open=lambda: io.BytesIO(b""),
        )
        self.editor.put(marker, self.pipeline.add(marker), nested_root=False)


def _settled(entry: tuple[SourceItem, PendingFile | None]) -> bool:
    return entry[1] is None or entry[1].done()


def _read_dirtab(item: SourceItem) -> Dirtab:
    assert item.open is not None
    with item.open() as handle:
        raw = handle.read(1 << 20)
    try:
        return Dirtab.parse(raw.decode())
    except UnicodeDecodeError as exc:
        raise PublishError(f"{DIRTAB}: not UTF-8 text ({exc.reason})") from exc
