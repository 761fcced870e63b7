"""Models from OCI registries: ORAS artifacts, CNCF ModelPack, KitOps ModelKits, container images.

DUCC (``cvmfs/cvmfs:ducc/``) unpacks container images into CernVM-FS but gunzips every layer and
expects a root filesystem, so it cannot take model artifacts (raw weight blobs, uncompressed or
zstd tars, one file per blob). This module keeps DUCC's pattern and widens what a layer may be:

1. **Resolve** the reference to one manifest (an index is narrowed to ``platform``), verified by
   digest; that manifest digest is the identity of what is ingested.
2. **Skip** when the target version's ``model.json`` already records that manifest digest: no
   blob is downloaded, no revision is written (DUCC compares the stored manifest the same way).
3. **Fetch** blobs into a digest-addressed folder (``<blob_dir>/sha256/<hex>``), each checked
   against its digest and size.
4. **Lay out** the files, by kind (:func:`classify`):

   * ``image`` (config ``application/vnd.oci.image.config.v1+json`` or Docker's): layers applied
     in order into one root filesystem, with whiteouts (``.wh.<name>``, ``.wh..wh..opq``), as
     DUCC's flat image; foreign / non-distributable layers are skipped as DUCC does.
   * ``modelpack`` (``application/vnd.cncf.model.*``): ``.raw`` layers are files at their
     ``org.cncf.model.filepath`` (or title), with mode/mtime from
     ``org.cncf.model.file.metadata+json``; ``.tar``, ``.tar+gzip``, ``.tar+zstd`` are unpacked.
   * ``kitops`` (``application/vnd.kitops.modelkit.*``): tar layers unpacked at the root.
   * ``artifact`` (ORAS and anything else): a layer with an ``org.opencontainers.image.title`` is
     the file of that name (its bytes as they are, whatever the media type says), unless ORAS
     marked it a packed directory (``io.deis.oras.content.unpack``, or oras-py's ``tar+gzip``
     directory layer); untitled tar layers are unpacked; any other blob is ``sha256-<hex>``.

   Compression is decided by the bytes (gzip, zstd or none), not only by the media type.
   Every tar goes through :class:`~cvmfs_ml.models.sources.unpack.TreeWriter` (no ``..``,
   absolute paths, escaping links or devices).
5. **Publish** the folder with :func:`cvmfs_ml.models.publish.publish_model`; ``source`` records
   the registry, repository, tag, manifest digest, media types, config and layer digests.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError, NotFoundError, UnsafeInputError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.base import (
    IngestResult,
    PulledModel,
    published_record,
    same_source,
)
from cvmfs_ml.models.sources.blob_ingest import BlobIngest
from cvmfs_ml.models.sources.limits import (
    MAX_BYTES,
    MAX_CATALOGS,
    MAX_CONFIG_BYTES,
    UnpackBudget,
    check_declared,
)
from cvmfs_ml.models.sources.oci_client import OciReference, RegistryClient
from cvmfs_ml.models.sources.oci_fetch import (
    distributable_layers,
    fetch_descriptor,
    fetch_layer,
    fetch_layers,
    fetched_blob,
    is_foreign,
    is_tar_type,
)
from cvmfs_ml.models.sources.oci_manifest import (
    ANNOTATION_FILE_METADATA,
    ANNOTATION_FILEPATH,
    ANNOTATION_TITLE,
    ANNOTATION_UNPACK,
    KITOPS_CONFIG,
    KITOPS_PREFIX,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    MODELPACK_PREFIX,
    ORAS_DIRECTORY_LAYER,
    ResolvedManifest,
    classify,
    resolve,
)
from cvmfs_ml.models.sources.unpack import (
    TreeWriter,
    materialise_links,
    open_decompressed,
    safe_relative,
)
from cvmfs_ml.publish.archive import STREAM_ERRORS
from cvmfs_ml.publish.repository import Publisher

__all__ = [
    "ANNOTATION_FILEPATH",
    "ANNOTATION_TITLE",
    "ANNOTATION_UNPACK",
    "KITOPS_CONFIG",
    "MODELPACK_ARTIFACT",
    "MODELPACK_CONFIG",
    "PulledModel",
    "ResolvedManifest",
    "classify",
    "distributable_layers",
    "fetch_layer",
    "fetch_layers",
    "fetched_blob",
    "ingest_oci",
    "known_file_digests",
    "pull",
    "resolve",
]

# Image config keys worth keeping in model.json (the rest is build history).
_IMAGE_CONFIG_KEYS = ("architecture", "os", "variant", "created", "author")
_IMAGE_RUNTIME_KEYS = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "Labels", "ExposedPorts")


# -- pull ------------------------------------------------------------------------------------------
def _digest_name(digest: str) -> str:
    return digest.replace(":", "-")


def _file_metadata(annotations: dict[str, Any]) -> tuple[int, float | None]:
    """Mode and mtime from ModelPack's ``org.cncf.model.file.metadata+json`` (defaults 0644)."""
    raw = annotations.get(ANNOTATION_FILE_METADATA)
    if not raw:
        return 0o644, None
    try:
        meta = jsontext.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError):
        return 0o644, None
    if not isinstance(meta, dict):
        return 0o644, None
    mode = meta.get("mode")
    mode = int(mode) & 0o777 if isinstance(mode, int) and mode & 0o777 else 0o644
    mtime = meta.get("mtime")
    stamp = None
    if isinstance(mtime, str):
        try:
            stamp = dt.datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            stamp = None
    elif isinstance(mtime, (int, float)) and not isinstance(mtime, bool):
        stamp = float(mtime)
    if stamp is not None and not 0 <= stamp < 2**33:  # nan, inf, 1e400: os.utime refuses
        stamp = None
    return mode, stamp


def _oras_directory(blob: Path, title: str) -> bool:
    """True when ``blob`` is a tarball whose every member lies in ``title/`` (oras-py's dirs)."""
    import tarfile

    try:
        with open_decompressed(blob) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            names = [m.name for m in tar]
    except (*STREAM_ERRORS, ValueError):
        return False
    prefix = title.rstrip("/")
    for name in names:
        clean = name[2:] if name.startswith("./") else name
        if clean.rstrip("/") != prefix and not clean.startswith(prefix + "/"):
            return False
    return bool(names)


def _unpack(writer: TreeWriter, blob: Path, what: str) -> dict[str, int]:
    with open_decompressed(blob) as stream:
        stats = writer.apply_tar(stream, what=what)
    return {"files": stats.files, "bytes": stats.bytes, "whiteouts": stats.whiteouts + stats.opaque}


def _place_artifact_layer(
    writer: TreeWriter,
    layer: dict[str, Any],
    blob: Path,
    kind: str,
    seen: set[str],
    move: bool,
) -> dict[str, Any]:
    """Lay one artifact layer out; returns how (``unpacked`` or ``file`` and its path)."""
    media_type = str(layer.get("mediaType", ""))
    annotations = dict(layer.get("annotations") or {})
    digest = str(layer["digest"])
    title = annotations.get(ANNOTATION_TITLE)
    what = f"layer {digest}"

    def as_file(name: str, mode: int = 0o644, mtime: float | None = None) -> dict[str, Any]:
        relative = safe_relative(str(name), what)
        if not relative:
            raise UnsafeInputError(what, f"empty file name {name!r}")
        if relative in seen:
            raise UnsafeInputError(what, f"two layers name the same file {relative!r}")
        seen.add(relative)
        writer.place_file(relative, blob, mode=mode, mtime=mtime, move=move, member=what)
        return {"as": "file", "path": relative}

    def unpacked() -> dict[str, Any]:
        return {"as": "unpacked", **_unpack(writer, blob, what)}

    if kind == "modelpack" and media_type.startswith(MODELPACK_PREFIX):
        if is_tar_type(media_type):
            return unpacked()
        mode, mtime = _file_metadata(annotations)
        name = annotations.get(ANNOTATION_FILEPATH) or title or _digest_name(digest)
        return as_file(name, mode, mtime)
    if kind == "kitops" and media_type.startswith(KITOPS_PREFIX):
        if ".tar" in media_type:
            return unpacked()
        return as_file(title or _digest_name(digest))
    if title:
        if str(annotations.get(ANNOTATION_UNPACK, "")).lower() == "true" or (
            media_type == ORAS_DIRECTORY_LAYER and _oras_directory(blob, str(title))
        ):
            return unpacked()
        return as_file(title)
    if is_tar_type(media_type):
        return unpacked()
    return as_file(_digest_name(digest))


def _read_config(client: RegistryClient, resolved: ResolvedManifest, blob_dir: Path) -> Any:
    descriptor = resolved.config
    digest = descriptor.get("digest")
    if not digest or int(descriptor.get("size") or 0) > MAX_CONFIG_BYTES:
        return None
    path = fetch_descriptor(client, resolved, descriptor, blob_dir)
    try:
        return jsontext.loads(path.read_bytes())
    except ValueError:
        return None  # configs of ORAS artifacts may be anything; only JSON is kept


def _config_summary(kind: str, config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        return {}
    if kind == "image":
        out = {k: config[k] for k in _IMAGE_CONFIG_KEYS if k in config}
        runtime = config.get("config") or {}
        out.update({k: runtime[k] for k in _IMAGE_RUNTIME_KEYS if runtime.get(k)})
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if diff_ids:
            out["diff_ids"] = diff_ids
        return out
    return config


def _describe(kind: str, config: Any, manifest: dict[str, Any]) -> tuple[str, str | None]:
    """Description and licence from a ModelPack descriptor, a Kitfile or manifest annotations."""
    annotations = manifest.get("annotations") or {}
    description = str(annotations.get("org.opencontainers.image.description") or "")
    licence = annotations.get("org.opencontainers.image.licenses")
    if isinstance(config, dict):
        if kind == "modelpack":
            descriptor = config.get("descriptor") or {}
            description = str(descriptor.get("description") or description)
            licenses = descriptor.get("licenses")
            if isinstance(licenses, list) and licenses:
                licence = " AND ".join(str(x) for x in licenses)
        elif kind == "kitops":
            package = config.get("package") or {}
            model = config.get("model") or {}
            description = str(package.get("description") or model.get("description") or description)
            licence = model.get("license") or package.get("license") or licence
    return description, (str(licence) if licence else None)


def pull(
    client: RegistryClient,
    resolved: ResolvedManifest,
    dest: Path,
    *,
    blob_dir: Path,
    keep_blobs: bool = True,
    subpath: str = "",
    workers: int = 4,
    ingest: BlobIngest | None = None,
    max_unpacked: int | None = None,
    max_catalogs: int = MAX_CATALOGS,
) -> PulledModel:
    """Download and lay out ``resolved`` into the new folder ``dest``.

    ``subpath`` selects the folder to publish (``models`` for a KServe modelcar image, whose
    model lives in ``/models``); the returned ``folder`` is ``dest/subpath``. Symlinks are made
    publishable with :func:`~cvmfs_ml.models.sources.unpack.materialise_links` and FIFOs
    dropped, both recorded in ``source``. ``keep_blobs=False`` lets single-use raw blobs be
    moved into place instead of copied (use it when ``blob_dir`` is scratch space). Blobs are
    downloaded by ``workers`` threads before any is laid out. With ``ingest``, a large blob
    of an artifact is also stored as a publisher's objects while it downloads; call
    ``ingest.remember(folder, source)`` once the result is final (see
    :mod:`~cvmfs_ml.models.sources.blob_ingest`). What the layers unpack to is held to
    ``max_unpacked`` bytes (default: :class:`~cvmfs_ml.models.sources.limits.UnpackBudget`'s),
    their ``.cvmfscatalog`` members to ``max_catalogs``.
    """
    dest = Path(dest)
    subpath = safe_relative(subpath.lstrip("/"), "subpath")
    if dest.exists() and any(dest.iterdir()):
        raise FormatError(str(dest), "destination folder is not empty")
    kind = resolved.kind
    config = _read_config(client, resolved, blob_dir)
    budget = UnpackBudget.for_layers(resolved.layers, max_unpacked, max_catalogs=max_catalogs)
    writer = TreeWriter(dest, rootfs=kind == "image", budget=budget)
    layers_out: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    blobs = fetch_layers(client, resolved, blob_dir, workers=workers, ingest=ingest)
    uses: dict[str, int] = {}
    for layer in resolved.layers:
        uses[str(layer["digest"])] = uses.get(str(layer["digest"]), 0) + 1
    for layer in resolved.layers:
        media_type = str(layer.get("mediaType", ""))
        entry: dict[str, Any] = {
            "digest": layer["digest"], "mediaType": media_type, "size": layer.get("size"),
        }  # fmt: skip
        if is_foreign(layer, kind):
            skipped.append(str(layer["digest"]))
            continue
        blob = blobs[str(layer["digest"])]
        if kind == "image":
            entry.update({"as": "layer", **_unpack(writer, blob, f"layer {layer['digest']}")})
        else:
            move = not keep_blobs and uses[str(layer["digest"])] == 1
            entry.update(_place_artifact_layer(writer, layer, blob, kind, seen, move))
        title = (layer.get("annotations") or {}).get(ANNOTATION_TITLE)
        if title:
            entry["title"] = title
        layers_out.append(entry)
    writer.finish()
    specials = writer.drop_specials()
    links = materialise_links(dest, subpath)
    folder = dest / subpath if subpath else dest
    if not folder.is_dir() or folder.is_symlink():
        raise NotFoundError(subpath, f"folder in {resolved.reference}")
    description, licence = _describe(kind, config, resolved.manifest)
    reference = resolved.reference
    source: dict[str, Any] = {
        "type": "oci",
        "kind": kind,
        "reference": str(reference),
        "registry": reference.registry,
        "repository": reference.repository,
        "tag": reference.tag,
        "manifest_digest": resolved.digest,
        "media_type": resolved.media_type,
        "artifact_type": resolved.manifest.get("artifactType"),
        "config_digest": resolved.config.get("digest"),
        "config_media_type": resolved.config.get("mediaType"),
        "config": _config_summary(kind, config),
        "layers": layers_out,
    }
    if resolved.index_digest:
        source["index_digest"] = resolved.index_digest
    if resolved.manifest.get("annotations"):
        source["annotations"] = resolved.manifest["annotations"]
    if skipped:
        source["skipped_layers"] = skipped
    if subpath:
        source["subpath"] = subpath
    if links.files or links.folders or links.dropped:
        source["symlinks"] = links.to_json()
    if specials:
        source["dropped_special_files"] = specials[:50]
    return PulledModel(folder, source, description, licence)


def known_file_digests(source: dict[str, Any] | None) -> dict[str, str]:
    """``{path: sha256 hex}`` of a pulled artifact's files that are whole layer blobs.

    A blob's bytes were checked against its ``sha256:`` digest when it was fetched, so
    ``model.json``'s SHA-256 need not read a multi-GiB weights file again. Only when every
    layer of ``source`` (:func:`pull`'s record) became one such file: an unpacked layer may
    write over a path, and a ``subpath`` moves the paths; then nothing is known.
    """
    source = source or {}
    layers = source.get("layers") or []
    if source.get("type") != "oci" or source.get("kind") == "image" or source.get("subpath"):
        return {}
    known: dict[str, str] = {}
    for layer in layers:
        algorithm, _, hexdigest = str(layer.get("digest", "")).partition(":")
        if layer.get("as") != "file" or algorithm != "sha256" or len(hexdigest) != 64:
            return {}
        known[str(layer["path"])] = hexdigest
    return known


# -- ingest ----------------------------------------------------------------------------------------
def ingest_oci(
    publisher: Publisher,
    reference: str | OciReference,
    ref: ModelRef,
    *,
    plain_http: bool = False,
    username: str | None = None,
    password: str | None = None,
    platform: str = "linux/amd64",
    subpath: str = "",
    blob_dir: Path | None = None,
    description: str | None = None,
    license: str | None = None,
    aliases: Sequence[str] = ("latest",),
    publisher_name: str | None = None,
    force: bool = False,
    client: RegistryClient | None = None,
    before_publish: Callable[[Path, dict[str, Any]], object] | None = None,
    max_bytes: int = MAX_BYTES,
    max_unpacked: int | None = None,
    max_catalogs: int = MAX_CATALOGS,
) -> IngestResult:
    """Publish the OCI artifact or image ``reference`` as model version ``ref``.

    ``subpath`` publishes one folder of the artifact or image (e.g. ``models``) instead of all.
    Idempotent: when ``ref`` already records the same manifest digest, nothing is downloaded or
    written and the existing record is returned with ``skipped=True`` (``force`` re-publishes,
    which :func:`publish_model` refuses if the version exists). ``blob_dir`` keeps verified
    blobs between runs (digest-addressed); by default they live in a scratch folder.
    ``before_publish(folder, source)`` runs once the artifact is laid out in ``folder`` (the
    registry tells the publisher's file cache what the blobs it already stored became).
    A manifest declaring more than ``max_bytes`` of layers is refused before any download;
    ``max_unpacked`` bounds what the layers unpack to (:mod:`cvmfs_ml.models.sources.limits`),
    ``max_catalogs`` the ``.cvmfscatalog`` files of the version (each a nested catalog).
    """
    from cvmfs_ml.models.publish import publish_model

    ref.require_version()
    subpath = safe_relative(subpath.lstrip("/"), "subpath")
    oci_ref = reference if isinstance(reference, OciReference) else OciReference.parse(reference)
    own_client = client is None
    client = client or RegistryClient(
        oci_ref.endpoint, plain_http=plain_http, username=username, password=password
    )
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        resolved = resolve(client, oci_ref, platform=platform)
        seconds["resolve"] = time.perf_counter() - start
        existing = published_record(publisher, ref)
        if not force and same_source(
            existing, {"type": "oci", "manifest_digest": resolved.digest, "subpath": subpath}
        ):
            assert existing is not None
            return IngestResult(ref, existing, existing.source, skipped=True, seconds=seconds)
        check_declared(resolved, max_bytes)
        with tempfile.TemporaryDirectory(prefix="cvmfs-ml-oci.") as scratch:
            folder = Path(scratch) / "model"
            start = time.perf_counter()
            # Large blobs from a remote registry are stored while they download; a caller
            # with its own client (the registry service) pre-ingested its blobs already.
            ingest = BlobIngest(publisher) if own_client else None
            pulled = pull(
                client,
                resolved,
                folder,
                blob_dir=Path(blob_dir) if blob_dir else Path(scratch) / "blobs",
                keep_blobs=blob_dir is not None,
                subpath=subpath,
                ingest=ingest,
                max_unpacked=max_unpacked,
                max_catalogs=max_catalogs,
            )
            if ingest is not None:
                ingest.remember(pulled.folder, pulled.source)
            seconds["pull"] = time.perf_counter() - start
            if before_publish is not None:
                before_publish(folder, pulled.source)
            start = time.perf_counter()
            record = publish_model(
                publisher,
                pulled.folder,
                ref,
                source=pulled.source,
                description=description if description is not None else pulled.description,
                license=license if license is not None else pulled.license,
                extra=pulled.extra or None,
                aliases=aliases,
                publisher_name=publisher_name,
                known_sha256=known_file_digests(pulled.source),
                max_catalogs=max_catalogs,
            )
            seconds["publish"] = time.perf_counter() - start
        return IngestResult(ref, record, pulled.source, skipped=False, seconds=seconds)
    finally:
        if own_client:
            client.close()
