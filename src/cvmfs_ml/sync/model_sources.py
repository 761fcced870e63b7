"""Model sources of a sync round: OCI artifacts by tag pattern, and local folders.

Each matching tag is a version of the wishlist's ``NAMESPACE/NAME`` (pulled and laid out by
:mod:`cvmfs_ml.models.sources.oci`: ORAS, ModelPack, KitOps, images with model files); tags
named in ``aliases`` move aliases to the version with the same manifest digest; ``latest``
follows the newest version added, in natural order (``v10`` after ``v9``). A version already
published from the same manifest digest is skipped without downloading; one whose tag now
names other content is an error (versions are immutable). Each tag that fails is one error
event; the others still sync. ``work`` is the round (:class:`cvmfs_ml.sync.engine._Round`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import NotFoundError, PublishError
from cvmfs_ml.models.layout import ALIAS_LATEST, ModelRef
from cvmfs_ml.models.sources.blob_ingest import BlobIngest
from cvmfs_ml.models.sources.oci import pull, resolve
from cvmfs_ml.sync.wishlist import ModelSpec

__all__ = ["plan_folder", "plan_oci"]


def _natural(version: str) -> tuple[Any, ...]:
    """Sort key putting ``v10`` after ``v9``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


def plan_oci(work: Any, repo: Any, scratch: Path, spec: ModelSpec) -> None:
    """Plan the versions and aliases of an ``oci://`` entry into the round ``work``."""
    image = spec.image
    assert image is not None
    client = work.client(image.registry, image.plain_http)
    tags = work.tags(image)
    alias_tags = list(spec.aliases)
    version_tags = [t for t in tags if t not in alias_tags]
    by_digest: dict[str, str] = {}
    new_versions: list[str] = []
    for index, tag in enumerate(version_tags):
        reference = image.reference(tag)
        version = spec.version if (spec.version and not image.wildcard) else str(tag)
        try:
            ref = spec.ref.with_version(version)
            resolved = resolve(client, reference, platform=spec.platform)
            by_digest.setdefault(resolved.digest, version)
            if _plan_oci_version(work, repo, scratch / f"v{index}", spec, ref, resolved):
                new_versions.append(version)
        except Exception as exc:  # the other tags still sync
            work.fail("sync_model", str(reference), exc, model=f"{spec.ref.key}:{version}")
    for alias in alias_tags:
        try:
            resolved = resolve(client, image.reference(alias), platform=spec.platform)
        except NotFoundError:
            continue  # the registry has no such tag (yet)
        version = by_digest.get(resolved.digest)
        if version is None:
            work.fail(
                "alias_model",
                str(image.reference(alias)),
                PublishError(f"tag {alias!r} names a manifest no version tag has"),
            )
            continue
        work.plan.aliases.append((spec.ref.with_version(version), alias))
    if ALIAS_LATEST not in alias_tags and new_versions:
        newest = max(new_versions, key=_natural)
        current = _alias_target(repo, spec.ref, ALIAS_LATEST)
        if current is None or _natural(newest) > _natural(current):  # never back to an older
            work.plan.aliases.append((spec.ref.with_version(newest), ALIAS_LATEST))


def _alias_target(repo: Any, ref: ModelRef, alias: str) -> str | None:
    """The version ``alias`` of model ``ref`` names in the published revision, if any."""
    path = ref.with_version(alias).path
    try:
        entry = repo.stat(path)
    except FileNotFoundError:
        return None
    return str(repo.readlink(path)) if entry.is_symlink else None


def _plan_oci_version(
    work: Any, repo: Any, folder: Path, spec: ModelSpec, ref: ModelRef, resolved: Any
) -> bool:
    """Pull one tag as version ``ref``; False when that version already holds it."""
    source = work.published_source(repo, ref)
    if source is not None:
        if source.get("manifest_digest") == resolved.digest:
            work.log(
                "skip_model", image=str(resolved.reference), model=str(ref), reason="unchanged"
            )
            return False
        raise PublishError(
            f"{ref} is published from {source.get('manifest_digest')} but"
            f" {resolved.reference} is now {resolved.digest}; versions are immutable"
            " (push a new tag)"
        )
    work.check_size(resolved)
    client = work.client(resolved.reference.registry, spec.image.plain_http if spec.image else None)
    ingest = BlobIngest(work.publisher)  # the weights are stored while they download
    pulled = pull(
        client,
        resolved,
        folder,
        blob_dir=folder.parent / "blobs",
        keep_blobs=False,
        subpath=spec.subpath,
        ingest=ingest,
        max_unpacked=work.options.max_unpacked_bytes,
    )
    ingest.remember(pulled.folder, pulled.source)
    work.add_version(ref, folder, pulled, str(resolved.reference), [])
    return True


def plan_folder(work: Any, spec: ModelSpec) -> None:
    ref = spec.ref.with_version(spec.version)
    folder = Path(spec.source).expanduser()
    if not folder.exists():
        raise NotFoundError(str(folder), "the folder named in the wishlist")
    work.add_version(ref, folder, None, str(folder), [ALIAS_LATEST, *spec.aliases])
