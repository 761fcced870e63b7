"""Push freshly fetched pieces of an open file into the kernel's page cache (FUSE notify_store).

Why: model loaders map weights (onnxruntime, onnxruntime-genai, safetensors) and touch them
page fault by page fault, in their own order. On a FUSE mount each fault that misses the page
cache is a synchronous round trip to the daemon for one readahead window, so a cold load of a
1 GiB model waits for hundreds of round trips even after every piece has arrived (a profiled
512 MiB Phi-3 load: all pieces in the cache after 1.7 s, the loader faulting for 2 s more).
When a piece that was fetched for an open file is stored in the page cache as soon as it is
verified, those faults become minor faults and a sequential reader finds its pages there too.

Only pieces fetched for files queued whole at open (large files, see
:meth:`Repository.open_file <cvmfs_ml.client.repository.Repository.open_file>`) are pushed,
and only when this process fetched them: a partial reader of a small or quota-bound file gets
nothing it did not ask for. Pieces a read has touched, and the next few after the furthest
read, are left out: a sequential reader asks for those itself and would get them twice.
The bytes go from the verified cache file through one reused 1 MiB buffer per thread
(bounded memory), on the prefetch thread that fetched the piece, or on a thread of its own for
a piece fetched before its open was registered here.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from cvmfs_ml.client.background import BackgroundPool

if TYPE_CHECKING:
    from cvmfs_ml.client.files import CvmfsFile
    from cvmfs_ml.client.prefetch import Fetched

__all__ = ["PUSH_BLOCK", "push_when_fetched", "pushed"]

log = logging.getLogger(__name__)

PUSH_BLOCK = 1 << 20
"""Bytes stored per notify call (and the per-thread buffer's size)."""

READER_MARGIN_PIECES = 2
"""Pieces just ahead of the furthest read that are left to the reader's own requests."""

_local = threading.local()
_registered: weakref.WeakKeyDictionary[Future[Fetched], set[int]] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()

Store = Callable[[int, int, Any], None]
"""``store(inode, offset, data)``: pyfuse3's ``notify_store``."""

_pushed = {"pieces": 0, "bytes": 0}
_pushed_lock = threading.Lock()


def pushed() -> dict[str, int]:
    """Pieces this process stored in mounted files' page caches, and their bytes (``cvmfs-ml
    stats``: ``page_push``). What the kernel keeps of them is its own affair: pushed pages are
    never read until a reader comes, so memory pressure takes them first."""
    with _pushed_lock:
        return dict(_pushed)


def push_when_fetched(handle: CvmfsFile, inode: int, store: Store) -> None:
    """Store each piece queued for ``handle`` at open in the page cache of ``inode`` once it
    has been fetched (pieces already cached, or fetched by another reader, are left alone).

    A piece whose fetch finished before this call (the open's prefetch is quick, the event
    loop that calls this is busy) is pushed all the same, from a thread of its own: on a
    loaded machine that was most of a file, and its reader then asked for every page."""
    caller = threading.get_ident()
    for future in handle.prefetching:
        with _registered_lock:  # a loader that opens the file per tensor: one push per piece
            inodes = _registered.setdefault(future, set())
            if inode in inodes:
                continue
            inodes.add(inode)
        if future.done():
            _late_pusher().submit(_push, future, handle, inode, store, None)
        else:
            future.add_done_callback(lambda f: _push(f, handle, inode, store, caller))


_late_pusher = BackgroundPool("cvmfs-ml-late-push", 1).get
"""One thread for pushes that must not run on the caller's thread (the FUSE event loop)."""


def _push(
    future: Future[Fetched], handle: CvmfsFile, inode: int, store: Store, caller: int | None
) -> None:
    if threading.get_ident() == caller:  # finished as the callback was added: pushed late
        _late_pusher().submit(_push, future, handle, inode, store, None)
        return  # (never copy megabytes on the caller's thread, the FUSE event loop)
    if future.cancelled() or future.exception() is not None:
        return
    fetched = future.result()
    if fetched.how != "fetch" or fetched.index < 0:
        return
    if _reader_is_near(handle, fetched.index):
        return
    layout = handle.layout
    digest = layout.pieces[fetched.index].digest
    offsets = [p.offset for p in layout.pieces if p.digest == digest]  # repeated pieces too
    try:
        fd = os.open(fetched.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # evicted meanwhile: readers fetch it again as usual
        return
    try:
        _store_file(fd, offsets, inode, store)
    except OSError as exc:  # the inode was forgotten, the mount is going away: harmless
        log.debug("page cache push of %s piece %d: %s", handle.name, fetched.index, exc)
        return
    finally:
        os.close(fd)
    with _pushed_lock:
        _pushed["pieces"] += 1
        _pushed["bytes"] += layout.pieces[fetched.index].size * len(offsets)
    if handle.drop_behind:  # its bytes are in the mounted file's page cache now
        handle.drop_pages([fetched.index])


def _reader_is_near(handle: CvmfsFile, index: int) -> bool:
    """Whether a read already touched piece ``index`` or is about to.

    A sequential reader (``cat``, ``cp``, a ``read()`` loop) waits at the fetch frontier and
    asks for each piece as soon as it arrives: the kernel's readahead serves it well, and a
    push of the same piece would only copy every byte twice. Pieces the reader has passed
    were copied by its reads already. What remains are pieces ahead of where reads happen
    (a loader that starts in the middle of the file, or a reader slower than the fetch).
    """
    read = handle.pieces_read
    if not read:
        return False
    if index in read:
        return True
    last = max(read)
    return last < index <= last + READER_MARGIN_PIECES


def _store_file(fd: int, offsets: list[int], inode: int, store: Store) -> None:
    """Store the piece's bytes at each of ``offsets`` in blocks that end on block boundaries
    of the file: the kernel keeps only whole pages, so a block that started or ended inside a
    page would leave that page to be read again (two per block, not two per piece)."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = memoryview(bytearray(PUSH_BLOCK))
        _local.view = view
    for offset in offsets:
        done = 0
        while True:
            room = PUSH_BLOCK - (offset + done) % PUSH_BLOCK  # up to the next boundary
            n = os.preadv(fd, [view[:room]], done)
            if n <= 0:
                break
            store(inode, offset + done, view[:n])
            done += n
