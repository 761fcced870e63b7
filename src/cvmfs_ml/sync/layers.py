"""DUCC's optional per-layer layout and podman's additional image store (ecosystem.md §1.4).

Enabled by ``layers: true`` in the wishlist or ``cvmfs-ml sync --layers``; off by default, as
the flat images are what Apptainer and upstream ``cvmfs2`` users read.

* ``/.layers/<d[0:2]>/<d>/layerfs/`` - one layer unpacked on its own (``d``: the hex of the
  *compressed* layer digest, as DUCC names it), one nested catalog each. Whiteout files stay
  as the layer holds them (``.wh.<name>``, ``.wh..wh..opq``): a layer is a diff, applied by
  whoever stacks the layers. A layer already there is skipped by its digest, never unpacked
  again.
* ``/.layers/<d[0:2]>/<d>/.metadata/layers.json`` - id, created, compressed and uncompressed
  (diff ID) digests, uncompressed size; ``origin.json`` next to it lists the image config
  digests that use the layer (DUCC's back-links).
* ``/podmanStore/`` - a containers/storage ``overlay`` store that podman reads as an
  ``additionalimagestores`` entry: ``overlay-images/images.json`` (one image per config
  digest, named ``<registry>/<repository>:<tag>``, with its manifest and config as big-data
  files), ``overlay-layers/layers.json`` (layer IDs as containers/image computes them: the diff
  ID for the base, ``sha256(parent + "+" + diff ID)`` above it) and ``overlay/<id>/diff``
  linking to the layer's ``layerfs`` (plus ``link``, ``lower`` and ``overlay/l/<short>``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError
from cvmfs_ml.models.layout import utc_timestamp
from cvmfs_ml.models.sources.limits import (
    MAX_CATALOGS,
    MAX_MEMBERS,
    UnpackBudget,
)
from cvmfs_ml.models.sources.oci import ResolvedManifest, distributable_layers, fetch_layer
from cvmfs_ml.models.sources.oci_client import check_digest
from cvmfs_ml.models.sources.unpack import TreeWriter, make_readable, open_decompressed
from cvmfs_ml.models.tree import read_bounded
from cvmfs_ml.publish.repository import Transaction
from cvmfs_ml.sync.images import HashingReader, image_config

__all__ = [
    "LAYERS_ROOT",
    "PODMAN_ROOT",
    "LayerSet",
    "UnpackedLayer",
    "layer_folder",
    "podman_layer_ids",
]

LAYERS_ROOT = "/.layers"
PODMAN_ROOT = "/podmanStore"
_MAX_JSON = 64 * 2**20  # a store's index files: bounded when read back


def layer_folder(digest: str) -> str:
    """``/.layers/<hex[0:2]>/<hex>`` of the compressed layer digest."""
    hexdigest = check_digest(digest).split(":", 1)[1]
    return f"{LAYERS_ROOT}/{hexdigest[:2]}/{hexdigest}"


def podman_layer_ids(diff_ids: list[str]) -> list[str]:
    """containers/image's storage layer IDs: the base's diff ID hex, then chained."""
    ids: list[str] = []
    for diff_id in diff_ids:
        hexdigest = check_digest(diff_id).split(":", 1)[1]
        ids.append(
            hashlib.sha256(f"{ids[-1]}+{hexdigest}".encode()).hexdigest() if ids else hexdigest
        )
    return ids


def _short_id(layer_id: str) -> str:
    """The 26-character name of ``overlay/l/`` (containers/storage makes it random)."""
    return base64.b32encode(hashlib.sha256(layer_id.encode()).digest()).decode()[:26]


def _big_data_name(key: str) -> str:
    """containers/storage's file name for an image's big-data item ``key``."""
    if all(c == "." or c.isdigit() or "a" <= c <= "z" for c in key):
        return key
    return "=" + base64.b64encode(key.encode()).decode()


@dataclass
class UnpackedLayer:
    """One layer unpacked alone in scratch space (what :func:`_root_owned` publishes)."""

    digest: str
    diff_id: str
    size: int
    compressed_size: int
    folder: Path
    modes: dict[str, int]
    owners: dict[str, tuple[int, int]]
    consume: bool = True

    def metadata(self) -> bytes:
        return _json(
            {
                "id": self.digest.split(":", 1)[1],
                "created": utc_timestamp(),
                "compressed_digest": self.digest,
                "uncompressed_digest": self.diff_id,
                "uncompressed_size": self.size,
                "compressed_size": self.compressed_size,
            }
        )


def unpack_layer(
    blob: Path, digest: str, dest: Path, budget: UnpackBudget | None = None
) -> UnpackedLayer:
    """Unpack the layer file ``blob`` on its own into ``dest`` (whiteout files kept)."""
    writer = TreeWriter(dest, rootfs=True, whiteouts=False, budget=budget)
    with open_decompressed(blob) as stream:
        hashing = HashingReader(stream)
        writer.apply_tar(io.BufferedReader(hashing, 1 << 20), what=f"layer {digest}")
        diff_id = hashing.drain(budget, f"layer {digest}")
    writer.finish()
    modes = make_readable(dest)
    return UnpackedLayer(
        digest, diff_id, hashing.size, blob.stat().st_size, dest, modes, dict(writer.owners)
    )


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def _read_json(repo: Any, path: str, default: Any) -> Any:
    try:
        raw = read_bounded(repo, path, _MAX_JSON, "not an index this store writes")
    except (FileNotFoundError, NotADirectoryError):
        return default
    try:
        return jsontext.loads(raw)
    except ValueError as exc:
        raise FormatError(path, f"not JSON: {exc}") from exc


@dataclass
class _PodmanImage:
    config_digest: str
    manifest_digest: str
    manifest: bytes
    config: bytes
    name: str
    layer_ids: list[str]
    diff_ids: list[str]
    sizes: list[int]  # uncompressed
    layers: list[dict[str, Any]]


@dataclass
class LayerSet:
    """What a round adds under ``/.layers`` and ``/podmanStore``."""

    new: dict[str, UnpackedLayer] = field(default_factory=dict)
    origins: dict[str, set[str]] = field(default_factory=dict)
    images: list[_PodmanImage] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)  # config digests no image uses any more
    pruned: dict[str, list[str]] = field(default_factory=dict)  # kept layers' new origin.json

    def plan_removals(self, repo: Any, used_configs: set[str]) -> list[str]:
        """The layer folders none of whose images is left (``used_configs``: the config digests
        of the flats that stay); the podman store forgets those images with them."""
        removals = []
        try:
            shards = [e.path for e in repo.listdir(LAYERS_ROOT) if e.is_dir]
        except (FileNotFoundError, NotADirectoryError):
            shards = []
        for shard in shards:
            for entry in repo.listdir(shard):
                if not entry.is_dir:
                    continue
                origin = _read_json(repo, f"{entry.path}/.metadata/origin.json", [])
                configs = {c for c in origin if isinstance(c, str)}
                digest = "sha256:" + entry.path.rsplit("/", 1)[1]
                if digest in self.origins:  # used by an image of this round
                    continue
                if not configs & used_configs:
                    removals.append(entry.path)
                    self.dropped |= configs
                elif configs - used_configs:
                    self.pruned[digest] = sorted(configs & used_configs)
                    self.dropped |= configs - used_configs
        images = _read_json(repo, f"{PODMAN_ROOT}/overlay-images/images.json", [])
        for image in images if isinstance(images, list) else []:
            config = f"sha256:{image.get('id', '')}" if isinstance(image, dict) else ""
            if config != "sha256:" and config not in used_configs:
                self.dropped.add(config)
        return removals

    def changes_podman(self) -> bool:
        return bool(self.images or self.dropped)

    def plan(
        self,
        repo: Any,
        client: Any,
        resolved: ResolvedManifest,
        manifest: bytes,
        name: str,
        scratch: Path,
        blob_dir: Path,
        max_unpacked: int | None = None,
        max_members: int = MAX_MEMBERS,
        max_catalogs: int = MAX_CATALOGS,
    ) -> list[str]:
        """Unpack the layers of ``resolved`` not yet published; returns the digests skipped.

        What they unpack to is held to ``max_unpacked`` bytes, ``max_members`` tar members and
        ``max_catalogs`` ``.cvmfscatalog`` files, as the flat image is (default:
        :meth:`~cvmfs_ml.models.sources.limits.UnpackBudget.for_layers`).
        """
        config_digest = check_digest(str(resolved.config.get("digest", "")))
        config = image_config(client, resolved, blob_dir)  # refused before any layer work
        budget = UnpackBudget.for_layers(resolved.layers, max_unpacked, max_members, max_catalogs)
        skipped: list[str] = []
        diff_ids: list[str] = []
        sizes: list[int] = []
        new: dict[str, UnpackedLayer] = {}  # kept only if the whole image works
        layers = distributable_layers(resolved)
        for layer in layers:
            digest = str(layer["digest"])
            folder = layer_folder(digest)
            done = self.new.get(digest) or new.get(digest)
            if done is None and repo.exists(f"{folder}/layerfs"):
                known = _read_json(repo, f"{folder}/.metadata/layers.json", {})
                diff_ids.append(str(known.get("uncompressed_digest", "")))
                sizes.append(int(known.get("uncompressed_size") or 0))
                skipped.append(digest)
                continue
            if done is None:
                blob = fetch_layer(client, resolved, layer, blob_dir)
                done = unpack_layer(blob, digest, scratch / digest.replace(":", "-"), budget)
                new[digest] = done
            diff_ids.append(done.diff_id)
            sizes.append(done.size)
        self.images.append(
            _PodmanImage(
                config_digest,
                resolved.digest,
                manifest,
                config,
                name,
                podman_layer_ids(diff_ids),
                diff_ids,
                sizes,
                layers,
            )
        )
        self.new.update(new)
        for layer in layers:
            self.origins.setdefault(str(layer["digest"]), set()).add(config_digest)
        return skipped

    def queue(self, txn: Transaction, repo: Any, root_owned: Any) -> None:
        """Queue the new layers, back-links and the podman store into ``txn``."""
        for digest, layer in sorted(self.new.items()):
            folder = layer_folder(digest)
            txn.add_items(
                lambda layer=layer, at=f"{folder}/layerfs": root_owned(layer, at),
                f"{folder}/layerfs",
                nested_catalog=True,
            )
            txn.add_bytes(f"{folder}/.metadata/layers.json", layer.metadata())
        for digest, remaining in sorted(self.pruned.items()):
            txn.add_bytes(f"{layer_folder(digest)}/.metadata/origin.json", _json(remaining))
        for digest, configs in sorted(self.origins.items()):
            path = f"{layer_folder(digest)}/.metadata/origin.json"
            old = _read_json(repo, path, [])
            merged = sorted({*(c for c in old if isinstance(c, str)), *configs})
            if merged != old:
                txn.add_bytes(path, _json(merged))
        if self.changes_podman():
            self._queue_podman(txn, repo)

    def _queue_podman(self, txn: Transaction, repo: Any) -> None:
        images_path = f"{PODMAN_ROOT}/overlay-images/images.json"
        layers_path = f"{PODMAN_ROOT}/overlay-layers/layers.json"
        images = {i["id"]: i for i in _read_json(repo, images_path, []) if isinstance(i, dict)}
        layers = {i["id"]: i for i in _read_json(repo, layers_path, []) if isinstance(i, dict)}
        for image_id in sorted(images):
            if f"sha256:{image_id}" in self.dropped:
                del images[image_id]
                if repo.exists(f"{PODMAN_ROOT}/overlay-images/{image_id}"):
                    txn.remove(f"{PODMAN_ROOT}/overlay-images/{image_id}")
        now = utc_timestamp()
        for image in self.images:
            image_id = image.config_digest.split(":", 1)[1]
            for other in images.values():  # a tag names one image: it moved here
                other["names"] = [n for n in other.get("names", []) if n != image.name]
            entry = images.get(image_id) or {"id": image_id, "created": now, "names": []}
            entry["names"] = sorted({*entry.get("names", []), image.name})
            entry["digest"] = image.manifest_digest
            entry["layer"] = image.layer_ids[-1] if image.layer_ids else ""
            entry["metadata"] = "{}"
            big = {
                "manifest": image.manifest,
                f"manifest-{image.manifest_digest}": image.manifest,
                image.config_digest: image.config,
            }
            entry["big-data-names"] = sorted(big)
            entry["big-data-sizes"] = {k: len(v) for k, v in big.items()}
            entry["big-data-digests"] = {
                k: f"sha256:{hashlib.sha256(v).hexdigest()}" for k, v in big.items()
            }
            images[image_id] = entry
            folder = f"{PODMAN_ROOT}/overlay-images/{image_id}"
            for key, data in big.items():
                txn.add_bytes(f"{folder}/{_big_data_name(key)}", data)
            parent = ""
            lower: list[str] = []
            for layer_id, diff_id, size, layer in zip(
                image.layer_ids, image.diff_ids, image.sizes, image.layers, strict=True
            ):
                digest = str(layer["digest"])
                record = {
                    "id": layer_id,
                    "created": now,
                    "compressed-diff-digest": digest,
                    "compressed-size": int(layer.get("size") or 0),
                    "diff-digest": diff_id,
                    "diff-size": size,
                }
                if parent:
                    record["parent"] = parent
                if layer_id not in layers:
                    layers[layer_id] = record
                    base = f"{PODMAN_ROOT}/overlay/{layer_id}"
                    layerfs = f"{layer_folder(digest)}/layerfs"
                    txn.symlink(f"{base}/diff", posixpath.relpath(layerfs, base))
                    short = _short_id(layer_id)
                    txn.add_bytes(f"{base}/link", short.encode())
                    txn.symlink(f"{PODMAN_ROOT}/overlay/l/{short}", f"../{layer_id}/diff")
                    if lower:
                        txn.add_bytes(f"{base}/lower", ":".join(reversed(lower)).encode())
                lower.append(f"l/{_short_id(layer_id)}")
                parent = layer_id
        used = set()  # the layer chains of the images that stay
        for image in images.values():
            layer_id = image.get("layer")
            while isinstance(layer_id, str) and layer_id in layers and layer_id not in used:
                used.add(layer_id)
                layer_id = layers[layer_id].get("parent")
        for layer_id in sorted(set(layers) - used):
            del layers[layer_id]
            for path in (
                f"{PODMAN_ROOT}/overlay/{layer_id}",
                f"{PODMAN_ROOT}/overlay/l/{_short_id(layer_id)}",
            ):
                if repo.exists(path):
                    txn.remove(path)
        txn.add_bytes(images_path, _json([images[k] for k in sorted(images)]))
        txn.add_bytes(layers_path, _json([layers[k] for k in sorted(layers)]))
        for lock in ("overlay-images/images.lock", "overlay-layers/layers.lock"):
            if not repo.exists(f"{PODMAN_ROOT}/{lock}"):
                txn.add_bytes(f"{PODMAN_ROOT}/{lock}", b"")
