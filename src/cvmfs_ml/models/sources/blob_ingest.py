"""Blobs that are stored as a repository's objects while they download.

A synced model artifact used to cost two passes: the download wrote the blob to disk, and the
publish then read the file again to chunk, hash and store it, one after the other (a 1 GiB
artifact: about 2 s, then about 2.5 s more here). Here the download's bytes go, as they arrive,
through the publisher's content pipeline as well as into the blob file, on the thread that
downloads (the pipeline's workers hash and store the pieces meanwhile). Once the blob's
digest is verified, its content (the chunk list) is known by that digest; when the artifact is
laid out, :meth:`BlobIngest.remember` records each file made from such a blob in the
publisher's file cache, so the publish takes the stored objects instead of reading the file:
the same mechanism as the registry's pre-ingest of pushed blobs.

A blob whose size or digest does not match raises as it did before (:class:`IntegrityError`)
and its content is never recorded; a failure of the pipeline itself (the store) fails the
download the same way, and the caller (a sync round) tries that tag again next round. Objects
made for a blob that is never published are garbage, which the next garbage collection
removes; a file cache entry whose objects are gone is a miss, and the publish reads the file.
One blob streams at a time (memory stays at one pipeline's bound); the others download as
before.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_ml.publish.filecache import remember_laid_out
from cvmfs_ml.publish.ingest import ContentPipeline, FileContent
from cvmfs_ml.publish.sources import SourceItem
from cvmfs_ml.storage.pagecache import UncachedWriter

if TYPE_CHECKING:
    from cvmfs_ml.client.transfer import Cancellation
    from cvmfs_ml.models.sources.oci_client import RegistryClient, VerifiedBlob
    from cvmfs_ml.publish.repository import Publisher

__all__ = ["BlobIngest"]


class _Tee(io.RawIOBase):
    """The verified blob stream, each read also written to the blob's file.

    The file is written around the page cache on a thread of its own (:class:`UncachedWriter`):
    the pipeline has the bytes already, and the file is read again only for its header (to
    describe the model) or by a later publish that misses the file cache.
    """

    def __init__(self, blob: VerifiedBlob, file: UncachedWriter) -> None:
        super().__init__()
        self._blob = blob
        self._file = file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._blob.readinto(buffer)
        self._file.write(memoryview(buffer).cast("B")[:n])
        return n


class BlobIngest:
    """Stores large blobs of one publisher's artifacts as objects while they download."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._lock = threading.Lock()
        self._busy = False
        self._contents: dict[str, FileContent] = {}

    def wants(self, size: int | None) -> bool:
        """Whether a blob of ``size`` bytes would be streamed (chunked files only: the only
        ones whose content the file cache keeps)."""
        settings = self.publisher.settings
        return settings.use_chunking and size is not None and size > settings.min_chunk_size

    def fetch(
        self,
        client: RegistryClient,
        repository: str,
        digest: str,
        size: int,
        dest: Path,
        cancel: Cancellation | None = None,
    ) -> Path | None:
        """Download blob ``digest`` to ``dest`` while storing its bytes as objects; ``None``
        when another blob is streaming (the caller downloads it as usual). ``cancel`` stops
        the download (:meth:`RegistryClient.open_blob`)."""
        with self._lock:
            if self._busy:
                return None
            self._busy = True
        part = dest.with_name(dest.name + f".part-{os.getpid()}")
        try:
            with client.open_blob(repository, digest, size=size, cancel=cancel) as blob:
                with (
                    UncachedWriter(part) as file,
                    ContentPipeline(self.publisher.store, self.publisher.settings) as pipeline,
                ):
                    tee = _Tee(blob, file)
                    item = SourceItem("/blob", stat.S_IFREG | 0o644, 0, size=size,
                                      open=lambda: tee)  # fmt: skip
                    content = pipeline.add(item).result()
                blob.finish()  # the whole stream was read: this checks size and digest
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
            with self._lock:
                self._busy = False
        with self._lock:
            self._contents[digest] = content
        return dest

    def remember(self, folder: Path, source: dict[str, Any]) -> int:
        """Once ``folder`` is laid out from ``source``'s layers (:func:`pull`'s record): record
        each file that is a streamed blob in the publisher's file cache. Returns how many."""
        if source.get("subpath"):
            return 0
        files = []
        for layer in source.get("layers") or []:
            with self._lock:
                content = self._contents.get(str(layer.get("digest")))
            if layer.get("as") == "file" and content is not None:
                files.append((Path(folder) / str(layer["path"]), content))
        return remember_laid_out(self.publisher.file_cache_path, self.publisher.settings, files)
