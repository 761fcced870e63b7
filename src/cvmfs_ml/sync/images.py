"""Container images laid out as DUCC lays them out on unpacked.cern.ch (ecosystem.md §1.4).

* ``/.flat/<c[0:2]>/<c>/`` - the image's root file system, ``c`` the hex of the image *config*
  digest, one nested catalog per image: the layers applied in order with OCI whiteouts by
  :class:`~cvmfs_ml.models.sources.unpack.TreeWriter` (the one place that applies layers).
* ``/<registry>/<repository>:<tag>`` - the public link, relative, to ``../../.flat/..``.
* ``/.metadata/<registry>/<repository>:<tag>/manifest.json`` - the source manifest as served
  (DUCC's commit marker) and ``image.json`` next to it (digests, flat path, size): what the next
  round compares with, so an unchanged tag is skipped without downloading anything.

Content is deduplicated three times: a config digest already flattened is only linked; layers are
fetched once into a digest-addressed blob folder shared by every image of a round; and every
file is a content-addressed CernVM-FS object, so files shared by images are stored once.
Owners are the layers' (uid/gid from the tar headers; the unprivileged unpacker records them
and the publisher writes them), not the syncing user's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.client.transfer import Cancellation
from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError
from cvmfs_ml.models.sources.limits import (
    MAX_CATALOGS,
    MAX_CONFIG_BYTES,
    MAX_MEMBERS,
    UnpackBudget,
    check_image_layers,
)
from cvmfs_ml.models.sources.oci import (
    ResolvedManifest,
    distributable_layers,
    fetch_layer,
    fetched_blob,
)
from cvmfs_ml.models.sources.oci_client import RegistryClient, check_digest
from cvmfs_ml.models.sources.unpack import (
    LayerStats,
    TreeWriter,
    decompressed,
    make_readable,
    open_decompressed,
)
from cvmfs_ml.models.tree import read_bounded
from cvmfs_ml.publish.repository import Transaction
from cvmfs_ml.publish.sources import SourceItem, scan_folder

__all__ = [
    "FLAT_ROOT",
    "IMAGE_JSON",
    "METADATA_ROOT",
    "FlatImage",
    "HashingReader",
    "ImageRecord",
    "flat_path",
    "image_config",
    "link_target",
    "metadata_folder",
    "public_path",
    "queue_image",
    "read_image_record",
    "read_image_records",
    "scratch_items",
    "unpack_flat",
]

FLAT_ROOT = "/.flat"
METADATA_ROOT = "/.metadata"
IMAGE_JSON = "image.json"
_STREAM_BUFFER = 1 << 20


def flat_path(config_digest: str) -> str:
    """``/.flat/<hex[0:2]>/<hex>`` for the image config digest (DUCC's ``GetSingularityPath``)."""
    hexdigest = check_digest(config_digest).split(":", 1)[1]
    return f"{FLAT_ROOT}/{hexdigest[:2]}/{hexdigest}"


def _name(repository: str, tag: str) -> str:
    """``repo:tag``, or ``repo@sha256:...`` for an image pinned by digest (as DUCC names it)."""
    return f"{repository}@{tag}" if ":" in tag else f"{repository}:{tag}"


def public_path(registry: str, repository: str, tag: str) -> str:
    """``/<registry>/<repository>:<tag>`` (``@<digest>`` when ``tag`` is a digest)."""
    return f"/{registry}/{_name(repository, tag)}"


def metadata_folder(registry: str, repository: str, tag: str) -> str:
    return f"{METADATA_ROOT}/{registry}/{_name(repository, tag)}"


def link_target(public: str, flat: str) -> str:
    """The relative link from ``public`` to ``flat`` (``../../.flat/xx/...``)."""
    return posixpath.relpath(flat, posixpath.dirname(public))


@dataclass
class ImageRecord:
    """``image.json``: what a public link was synced from."""

    image: str
    registry: str
    repository: str
    tag: str
    manifest_digest: str
    config_digest: str
    flat: str
    size_bytes: int
    synced: str
    owner: str = ""  # the wishlist that asked for it: only that one removes it

    @property
    def public_path(self) -> str:
        return public_path(self.registry, self.repository, self.tag)

    @property
    def metadata(self) -> str:
        return metadata_folder(self.registry, self.repository, self.tag)

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> ImageRecord:
        try:
            data = jsontext.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(what, f"not an image record: {exc}") from exc


@dataclass
class FlatImage:
    """An image unpacked in scratch space, ready to be queued."""

    folder: Path
    config_digest: str
    modes: dict[str, int]  # original modes of entries made readable for publishing
    size_bytes: int
    layers: int
    owners: dict[str, tuple[int, int]]  # (uid, gid) from the layers, where not root
    consume: bool = True  # scratch: each file is deleted once the publisher has opened it


class HashingReader(io.RawIOBase):
    """Counts and hashes what is read through it (the layer's diff ID)."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._read = getattr(stream, "read1", stream.read)  # what has arrived: no waiting for
        self._hasher = hashlib.sha256()  # a full buffer while a layer streams in
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        self._hasher.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self, budget: UnpackBudget | None = None, what: str = "layer") -> str:
        """Read what the tar reader left (the diff ID covers it): counted in ``budget``, so
        compressed zeros after the archive's end cannot keep it hashing for ever."""
        while chunk := self.read(1 << 20):
            if budget is not None:
                budget.spend(len(chunk), what, "(after the end of the archive)")
        return f"sha256:{self._hasher.hexdigest()}"


def image_config(client: Any, resolved: ResolvedManifest, blob_dir: Path) -> bytes:
    """The image's config blob, at most :data:`MAX_CONFIG_BYTES` (checked on the declared size
    before it is fetched, and on what is read)."""
    size = resolved.config.get("size")
    what = f"config {resolved.config.get('digest')}"
    if not isinstance(size, int) or size > MAX_CONFIG_BYTES:
        raise FormatError(what, f"declares {size} bytes, more than the limit of {MAX_CONFIG_BYTES}")
    path = fetch_layer(client, resolved, resolved.config, blob_dir)
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise FormatError(what, f"more than the limit of {MAX_CONFIG_BYTES} bytes")
    return data


def _diff_ids(config: bytes, resolved: ResolvedManifest) -> list[str | None]:
    """The uncompressed digest the config names for each layer of ``resolved`` (None: none
    named; a config without ``rootfs.diff_ids`` cannot be another image's, whose has them)."""
    what = f"config {resolved.config.get('digest')}"
    try:
        rootfs = jsontext.loads(config).get("rootfs")
    except (ValueError, AttributeError) as exc:
        raise FormatError(what, "not a JSON object") from exc
    named = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if named is None:
        return [None] * len(resolved.layers)
    if not isinstance(named, list) or len(named) != len(resolved.layers):
        raise FormatError(what, "rootfs.diff_ids does not name one digest per layer")
    return [check_digest(str(d)) for d in named]


def _verified(what: str, got: str, expected: str | None) -> None:
    if expected is not None and got != expected:
        raise FormatError(
            what,
            f"not the layer its image config names (rootfs.diff_ids), image refused: diff ID"
            f" {got}, expected {expected}",
        )


def _apply_hashed(writer: TreeWriter, stream: BinaryIO, what: str, expected: str | None) -> Any:
    """Apply the decompressed tar ``stream``, checking its digest against ``expected``."""
    hashing = HashingReader(stream)
    stats = writer.apply_tar(io.BufferedReader(hashing, _STREAM_BUFFER), what=what)
    _verified(what, hashing.drain(writer.budget, what), expected)
    return stats


def _apply_streamed(
    writer: TreeWriter,
    client: Any,
    resolved: ResolvedManifest,
    layer: dict[str, Any],
    expected: str | None,
) -> LayerStats:
    """Apply ``layer`` while it downloads: HTTP -> verify -> decompress -> untar, no blob file.

    The digest is checked at the end of the stream; if it does not match, the caller throws the
    whole tree away (nothing of it was published).
    """
    digest = str(layer["digest"])
    with (
        client.open_blob(resolved.reference.repository, digest, size=int(layer["size"])) as blob,
        decompressed(io.BufferedReader(blob, _STREAM_BUFFER)) as stream,
    ):
        stats = _apply_hashed(writer, stream, f"layer {digest}", expected)
        blob.finish()
    return stats


def unpack_flat(
    client: RegistryClient,
    resolved: ResolvedManifest,
    dest: Path,
    blob_dir: Path,
    *,
    workers: int = 4,
    stream: bool = True,
    max_unpacked: int | None = None,
    max_members: int = MAX_MEMBERS,
    max_catalogs: int = MAX_CATALOGS,
) -> FlatImage:
    """Download the layers of ``resolved`` and apply them in order into the new folder ``dest``.

    Downloads overlap the unpacking: the first layer not yet in ``blob_dir`` is unpacked as it
    streams in, while the others download in parallel into ``blob_dir`` (shared by the images of
    a round, so a base layer is fetched once) and are applied as soon as their turn comes.
    Raises on a layer whose bytes do not match its digest, a layer that is not a tar, or a
    hostile member (``..``, absolute names, writing through links, devices, sparse files), more
    than :data:`~cvmfs_ml.models.sources.limits.MAX_LAYERS` layers, or
    layers unpacking to more than ``max_unpacked`` bytes (default:
    :meth:`~cvmfs_ml.models.sources.limits.UnpackBudget.for_layers`) or holding more than
    ``max_members`` tar members or ``max_catalogs`` ``.cvmfscatalog`` files; ``dest`` is
    removed then, and nothing of the image is published.
    """
    check_image_layers(resolved)
    layers = distributable_layers(resolved)  # foreign layers live elsewhere: skipped as DUCC does
    budget = UnpackBudget.for_layers(resolved.layers, max_unpacked, max_members, max_catalogs)
    try:
        return _unpack_layers(client, resolved, layers, dest, blob_dir, workers, stream, budget)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # a refused image leaves no scratch behind
        raise


def _unpack_layers(
    client: RegistryClient,
    resolved: ResolvedManifest,
    layers: list[dict[str, Any]],
    dest: Path,
    blob_dir: Path,
    workers: int,
    stream: bool,
    budget: UnpackBudget,
) -> FlatImage:
    config = check_digest(str(resolved.config.get("digest", "")))
    diff_ids = _diff_ids(image_config(client, resolved, blob_dir), resolved)
    named = zip(resolved.layers, diff_ids, strict=True)
    expected = {id(layer): diff_id for layer, diff_id in named}  # by position, foreign ones too
    writer = TreeWriter(dest, rootfs=True, budget=budget)
    size = 0
    stream_first = (
        stream
        and hasattr(client, "open_blob")
        and bool(layers)
        and isinstance(layers[0].get("size"), int)  # a bound on what the stream may send
        and not fetched_blob(blob_dir, str(layers[0]["digest"])).exists()
    )
    later = layers[1:] if stream_first else layers
    # A refused layer or SIGTERM cancels the downloads (their sockets shut down, answered or
    # not yet), so the pool's shutdown does not wait for a stalled registry.
    with (
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="sync-layer") as pool,
        Cancellation() as cancel,
    ):
        futures: dict[str, Future[Path]] = {}
        for layer in later:
            digest = str(layer["digest"])
            if digest not in futures:
                futures[digest] = pool.submit(
                    fetch_layer, client, resolved, layer, blob_dir, cancel
                )
        try:
            for position, layer in enumerate(layers):
                digest = str(layer["digest"])
                if position == 0 and stream_first:
                    stats = _apply_streamed(writer, client, resolved, layer, expected[id(layer)])
                else:
                    with open_decompressed(futures[digest].result()) as stream:
                        stats = _apply_hashed(
                            writer, stream, f"layer {digest}", expected[id(layer)]
                        )
                size += stats.bytes
        finally:
            for future in futures.values():
                future.cancel()
    writer.finish()
    modes = make_readable(dest)
    return FlatImage(dest, config, modes, size, len(layers), dict(writer.owners))


def _consumed(path: str) -> Callable[[], BinaryIO]:
    """Open the scratch file ``path`` once: its name goes as soon as it is open.

    The publisher reads each file exactly once; unlinked scratch files never reach the disk
    (their dirty pages are dropped, not written by the publish's ``syncfs``).
    """

    def open_once() -> BinaryIO:
        handle = open(path, "rb")  # noqa: SIM115 - the publisher closes it
        os.unlink(path)
        return handle

    return open_once


def scratch_items(flat: Any, at: str) -> Iterator[SourceItem]:
    """The unpacked ``flat`` (a :class:`FlatImage` or a layer) as items at ``at``, with the
    layers' modes and owners."""
    prefix = len(at) + 1
    folder = str(flat.folder)
    for item in scan_folder(flat.folder, at, include_xattrs=False):
        relative = item.path[prefix:] if item.path != at else ""
        if relative in flat.modes:
            item.mode = stat.S_IFMT(item.mode) | flat.modes[relative]
        item.uid, item.gid = flat.owners.get(relative, (0, 0))
        # Scratch files are read once and deleted: remembering them in the publisher's file
        # cache (one SQLite row each) would cost more than the publish itself.
        item.file_key = None
        if item.open is not None and flat.consume:
            item.open = _consumed(os.path.join(folder, relative))  # not Path: per entry
        yield item


def queue_image(
    txn: Transaction,
    record: ImageRecord,
    manifest: bytes,
    flat: FlatImage | None,
    *,
    replace_link: bool,
) -> None:
    """Queue the flat image (if new), the public link and the metadata into ``txn``."""
    if flat is not None:
        txn.add_items(lambda: scratch_items(flat, record.flat), record.flat, nested_catalog=True)
    if replace_link:
        txn.symlink(record.public_path, link_target(record.public_path, record.flat))
    txn.add_bytes(f"{record.metadata}/manifest.json", manifest)
    txn.add_bytes(f"{record.metadata}/{IMAGE_JSON}", record.to_bytes())


MAX_IMAGE_RECORD_BYTES = 1 << 20
"""The largest ``image.json`` read back (one is a few hundred bytes)."""


def read_image_record(repo: Any, path: str) -> ImageRecord:
    """The record at ``path``, refused (:class:`FormatError`) from its catalog entry when over
    :data:`MAX_IMAGE_RECORD_BYTES`, before any byte is fetched."""
    raw = read_bounded(repo, path, MAX_IMAGE_RECORD_BYTES, "not a record sync writes")
    return ImageRecord.from_bytes(raw, path)


def read_image_records(repo: Any) -> dict[str, ImageRecord]:
    """Every synced image in the published repository, by public path."""
    out: dict[str, ImageRecord] = {}
    try:
        entries = list(repo.walk(METADATA_ROOT))
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.is_regular and entry.path.endswith("/" + IMAGE_JSON):
            try:
                record = read_image_record(repo, entry.path)
            except FormatError:
                continue  # a hand-edited record: the image is converted again
            out[record.public_path] = record
    return out
