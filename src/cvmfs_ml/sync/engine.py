"""One sync round: wishlist -> registries -> at most one new revision.

A round holds the repository's sync lock (``<keys>/<fqrn>.sync.lock``, so several sync
processes can share a repository, as DUCC's ``/tmp/DUCC.lock``) and goes:

1. **Plan**, reading the published revision: expand ``*`` tags, resolve every manifest, skip
   what is already there (same manifest digest in ``image.json`` / ``model.json``). New images
   and models are downloaded and unpacked into scratch space; anything that fails (unreachable
   registry, digest mismatch, hostile layer) is one ``error`` event and is left out whole.
2. **Commit** everything that survived in ONE transaction: flat images, links, metadata, model
   versions and aliases, removals. Nothing changed -> no transaction, no revision.
3. **Forget** what left the wishlist: links this wishlist published (``image.json``'s
   ``owner``, its ``name:``; other wishlists' links are never touched) and flats no link uses
   any more are removed once unwanted for ``grace_seconds`` (first seen unwanted is kept in
   ``<keys>/<fqrn>.sync-state.json``). Their objects are garbage collected at the first round
   after the next revision, once ``trunk-previous`` no longer names them.

See ``docs/sync.md`` for the wishlist, the layout and the events.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError, CvmfsMlError, PublishError, is_disk_full
from cvmfs_ml.models.layout import ModelRef, utc_timestamp
from cvmfs_ml.models.publish import ModelBatch, PreparedVersion, open_published, prepare_version
from cvmfs_ml.models.sources.limits import (
    MAX_BYTES,
    MAX_CATALOGS,
    MAX_MEMBERS,
    check_declared,
    check_image_layers,
)
from cvmfs_ml.models.sources.oci import known_file_digests, resolve
from cvmfs_ml.models.sources.oci_client import RegistryClient
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.publish.gc import collect_garbage
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.auth import AuthFile
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.images import (
    FLAT_ROOT,
    IMAGE_JSON,
    FlatImage,
    ImageRecord,
    flat_path,
    public_path,
    queue_image,
    read_image_records,
    scratch_items,
    unpack_flat,
)
from cvmfs_ml.sync.layers import LayerSet, layer_folder
from cvmfs_ml.sync.mlflow_source import plan_mlflow
from cvmfs_ml.sync.model_sources import plan_folder, plan_oci
from cvmfs_ml.sync.scratch import round_scratch
from cvmfs_ml.sync.wishlist import ImageSpec, Wishlist

__all__ = ["RoundReport", "SyncOptions", "check_target", "run_round", "sync_lock"]

_logger = logging.getLogger(__name__)


@dataclass
class SyncOptions:
    plain_http: bool = False  # for references written without a scheme
    grace_seconds: float = 7 * 86400.0
    gc: bool = True
    platform: str = "linux/amd64"
    auth: AuthFile = field(default_factory=AuthFile)
    only_repositories: frozenset[str] | None = None  # a webhook names what changed
    scratch: Path | None = None
    max_bytes: int = MAX_BYTES  # per image or model version, as the manifest declares it
    max_unpacked_bytes: int | None = None  # what one unpacks to; None: models/sources/limits.py
    max_members: int = MAX_MEMBERS  # tar members of one image's layers (empty files cost too)
    max_catalogs: int = MAX_CATALOGS  # .cvmfscatalog files of one image's layers
    layers: bool = False  # also DUCC's /.layers/ and podman's store (sync/layers.py)


@dataclass
class RoundReport:
    revision_before: int
    revision_after: int
    changes: int
    errors: int
    seconds: float
    gc_removed: int | None = None

    @property
    def committed(self) -> bool:
        return self.revision_after != self.revision_before

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, committed=self.committed)


@contextlib.contextmanager
def sync_lock(publisher: Publisher) -> Iterator[None]:
    path = publisher.keys_dir / f"{publisher.fqrn}.sync.lock"
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _disk_full(publisher: Publisher, options: SyncOptions, log: EventLog) -> PublishError:
    """The error for a round that ran out of disk, after collecting the objects it left (as
    upstream's, a failed transaction's objects stay until a collection; on a full disk they
    would fail every later round)."""
    collected = ""
    if options.gc and publisher.settings.garbage_collection:
        try:
            report = collect_garbage(publisher)
        except CvmfsMlError as exc:
            log("gc", status="error", error=str(exc).splitlines()[0])
        else:
            log("gc", removed=report.removed, size_bytes=report.bytes_removed)
            freed = report.bytes_removed / 2**20
            collected = f"; {freed:.1f} MiB of unreferenced objects collected"
    return PublishError(
        f"{publisher.fqrn}: the repository's disk is full, nothing was published{collected}; "
        "free space on it (or sync fewer images or models per round) and run again"
    )


# -- state kept next to the keys (not published: it is the syncer's memory) ---------------------
def _state_path(publisher: Publisher) -> Path:
    return publisher.keys_dir / f"{publisher.fqrn}.sync-state.json"


def _load_state(publisher: Publisher) -> dict[str, Any]:
    try:
        data = json.loads(_state_path(publisher).read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("unwanted", {}), dict):
        data = {}  # a damaged state file only restarts the grace periods
    data.setdefault("unwanted", {})
    return data


def _save_state(publisher: Publisher, state: dict[str, Any]) -> None:
    path = _state_path(publisher)
    part = path.with_name(path.name + f".{os.getpid()}")
    part.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(part, path)


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class _ImagePlan:
    record: ImageRecord
    manifest: bytes
    flat: FlatImage | None  # None: the flat is already there, only link and metadata change
    replace_link: bool


@dataclass
class _Plan:
    images: list[_ImagePlan] = field(default_factory=list)
    versions: list[PreparedVersion] = field(default_factory=list)
    aliases: list[tuple[ModelRef, str]] = field(default_factory=list)
    removals: list[str] = field(default_factory=list)
    owners: list[ImageRecord] = field(default_factory=list)  # image.json taken over by a name

    def empty(self) -> bool:
        return not (self.images or self.versions or self.aliases or self.removals or self.owners)


class _Round:
    def __init__(
        self, publisher: Publisher, wishlist: Wishlist, options: SyncOptions, log: EventLog
    ) -> None:
        self.publisher = publisher
        self.wishlist = wishlist
        self.options = options
        self.log = log
        self.clients: dict[tuple[str, bool], RegistryClient] = {}
        self.plan = _Plan()
        self.errors = 0
        self.state = _load_state(publisher)
        self.layers = LayerSet() if (options.layers or wishlist.layers) else None

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def client(self, registry: str, plain_http: bool | None) -> RegistryClient:
        plain = self.options.plain_http if plain_http is None else plain_http
        endpoint = (
            "registry-1.docker.io"
            if registry in ("docker.io", "registry.hub.docker.com")
            else registry
        )
        key = (endpoint, plain)
        if key not in self.clients:
            user, password = self.options.auth.credentials(registry)
            self.clients[key] = RegistryClient(
                endpoint, plain_http=plain, username=user, password=password, timeout=60.0
            )
        return self.clients[key]

    def fail(self, action: str, what: str, exc: BaseException, **fields: Any) -> None:
        """One error event for ``what``; the round goes on with the others."""
        self.errors += 1
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, (CvmfsMlError, OSError, ValueError)):
            # A bug, or an input no check knows yet: still only this entry's failure.
            _logger.debug("%s %s failed", action, what, exc_info=exc)
            message = f"internal error (please report): {type(exc).__name__}: {message}"
        self.log(action, image=what, status="error", error=message, **fields)

    def wanted(self, registry: str, repository: str) -> bool:
        only = self.options.only_repositories
        return only is None or repository in only or f"{registry}/{repository}" in only

    def check_size(self, resolved: Any) -> None:
        """Refuse, before any download, what declares more than ``max_bytes`` of layers."""
        check_declared(resolved, self.options.max_bytes)

    def tags(self, spec: ImageSpec) -> list[str | None]:
        """The tags an entry names (a wildcard is listed); ``[None]`` for a pinned digest."""
        if spec.digest is not None and spec.tag_pattern is None:
            return [None]
        if not spec.wildcard:
            return [spec.tag_pattern]
        client = self.client(spec.registry, spec.plain_http)
        return [t for t in client.list_tags(spec.repository) if spec.matches(t)]

    # -- images ---------------------------------------------------------------------------------
    def plan_images(self, repo: Any, scratch: Path, existing: dict[str, ImageRecord]) -> set[str]:
        """Plan every ``input`` image; returns the public paths still wanted."""
        keep: set[str] = set()
        flats_now = {r.flat for r in existing.values()}
        planned_flats: set[str] = set()
        for spec in self.wishlist.images:
            owned = {
                p
                for p, r in existing.items()
                if (r.registry, r.repository) == (spec.registry, spec.repository)
            }
            if not self.wanted(spec.registry, spec.repository):
                keep |= owned  # not this round's business
                continue
            try:
                tags = self.tags(spec)
            except Exception as exc:  # one entry's failure, whatever it is
                self.fail("expand_wildcard", spec.text, exc)
                keep |= owned  # an unreachable registry removes nothing
                continue
            for tag in tags:
                reference = spec.reference(tag)
                public = public_path(spec.registry, spec.repository, reference.reference)
                keep.add(public)
                try:
                    self.plan_image(
                        repo, scratch, spec, reference, existing, flats_now, planned_flats
                    )
                except Exception as exc:  # this image fails, not the round
                    self.fail("convert_image", str(reference), exc, public_path=public)
        return keep

    def plan_image(
        self,
        repo: Any,
        scratch: Path,
        spec: ImageSpec,
        reference: Any,
        existing: dict[str, ImageRecord],
        flats_now: set[str],
        planned_flats: set[str],
    ) -> None:
        client = self.client(spec.registry, spec.plain_http)
        resolved = resolve(client, reference, platform=self.options.platform)
        if resolved.kind != "image":
            raise PublishError(f"{reference} is a {resolved.kind}, not a container image")
        config = str(resolved.config.get("digest", ""))
        tag = reference.reference
        public = public_path(spec.registry, spec.repository, tag)
        old = existing.get(public)
        if old is not None and old.manifest_digest == resolved.digest and repo.exists(public):
            self.log("skip_image", image=str(reference), public_path=public, reason="unchanged")
            return
        check_image_layers(resolved)
        manifest = client.get_manifest(spec.repository, resolved.digest).data
        flat = None
        target = flat_path(config)
        size = 0
        if target in flats_now or target in planned_flats or repo.exists(target):
            action = "move_link"  # same image content under another tag: only the link moves
            size = next((r.size_bytes for r in existing.values() if r.flat == target), 0)
        else:
            self.check_size(resolved)
            folder = scratch / "images" / target.rsplit("/", 1)[1]
            flat = unpack_flat(
                client, resolved, folder, scratch / "blobs", stream=self.layers is None,
                max_unpacked=self.options.max_unpacked_bytes, max_members=self.options.max_members,
                max_catalogs=self.options.max_catalogs,
            )  # fmt: skip
            size = flat.size_bytes
            action = "publish_flat_image"
        if self.layers is not None:  # after the flat, whose blobs it reuses
            self.check_size(resolved)
            skipped = self.layers.plan(
                repo, client, resolved, manifest, public[1:], scratch / "layers", scratch / "blobs",
                self.options.max_unpacked_bytes, self.options.max_members,
                self.options.max_catalogs,
            )  # fmt: skip
            for digest in skipped:
                self.log("skip_layer", image=str(reference), layer_digest=digest)
        record = ImageRecord(
            owner=self.wishlist.origin,
            image=str(reference),
            registry=spec.registry,
            repository=spec.repository,
            tag=tag,
            manifest_digest=resolved.digest,
            config_digest=config,
            flat=target,
            size_bytes=size,
            synced=utc_timestamp(),
        )
        link_moves = old is None or old.flat != target or not repo.exists(public)
        if flat is None and not link_moves:
            action = "update_metadata"  # a new manifest for the same image: the link stays
        if flat is not None:
            planned_flats.add(target)
        self.plan.images.append(_ImagePlan(record, manifest, flat, link_moves))
        self.log(
            action,
            image=str(reference),
            public_path=public,
            private_path=target,
            size_bytes=size,
            manifest_digest=resolved.digest,
        )

    def plan_removals(self, repo: Any, existing: dict[str, ImageRecord], keep: set[str]) -> None:
        """Schedule (and after the grace period, queue) removals of what this wishlist left.

        Only links this wishlist published (``image.json``'s ``owner``: its name, or its path
        before it had one, those records then taken over by the name) are candidates, so sync
        processes with different wishlists can share a repository. A flat goes when no link
        uses it any more: with its last link, or after the grace period when it was orphaned
        by a tag that moved.
        """
        unwanted: dict[str, float] = self.state["unwanted"]
        now = time.time()
        owner = self.wishlist.origin
        replanned = {plan.record.public_path: plan.record for plan in self.plan.images}
        mine = {p for p, r in existing.items() if self.wishlist.owns(r.owner)}
        stale_links = {p for p in mine if p not in keep and p not in replanned}
        due = set()
        for key in sorted(stale_links):
            since = unwanted.setdefault(key, now)
            if now - since >= self.options.grace_seconds:
                due.add(key)
            else:
                self.log(
                    "schedule_removal",
                    image=existing[key].image,
                    public_path=key,
                    remove_after_s=round(self.options.grace_seconds - (now - since), 1),
                )
        remaining = {p: r for p, r in existing.items() if p not in due}
        remaining.update(replanned)
        used_flats = {r.flat for r in remaining.values()}
        try:
            shards = [e.path for e in repo.listdir(FLAT_ROOT) if e.is_dir]
            flats = {e.path for s in shards for e in repo.listdir(s) if e.is_dir}
        except (FileNotFoundError, NotADirectoryError):
            flats = set()
        freed = {existing[p].flat for p in due}
        orphans = set()
        for flat in sorted(flats - used_flats):
            since = unwanted.setdefault(flat, now)
            if flat in freed or now - since >= self.options.grace_seconds:
                orphans.add(flat)
        for key in list(unwanted):  # wanted again (or gone): forget the date
            if (key in mine or key.startswith(FLAT_ROOT + "/")) and key not in (
                stale_links | (flats - used_flats)
            ):
                del unwanted[key]
        for key in sorted(mine - due - replanned.keys()):
            if existing[key].owner != owner:  # written under the path: the name's from now on
                self.plan.owners.append(replace(existing[key], owner=owner))
                self.log("update_metadata", image=existing[key].image, public_path=key,
                         owner=owner)  # fmt: skip
        for key in sorted(due):
            record = existing[key]
            self.plan.removals += [p for p in (key, record.metadata) if repo.exists(p)]
            unwanted.pop(key, None)
            self.log("remove_image", image=record.image, public_path=key)
        for flat in sorted(orphans):
            unwanted.pop(flat, None)
            self.log("remove_flat_image", private_path=flat)
        for shard in sorted({f.rsplit("/", 1)[0] for f in orphans}):
            inside = {f for f in flats if f.startswith(shard + "/")}
            # An emptied /.flat/xx goes with its last flat.
            self.plan.removals += [shard] if inside <= orphans else sorted(inside & orphans)
        if self.layers is not None:  # layers go with the last flat that uses them
            kept = (flats | {r.flat for r in remaining.values()}) - orphans
            used = {"sha256:" + flat.rsplit("/", 1)[1] for flat in kept}
            for path in self.layers.plan_removals(repo, used):
                self.plan.removals.append(path)
                self.log("remove_layer", private_path=path)

    # -- models ---------------------------------------------------------------------------------
    def plan_models(self, repo: Any, scratch: Path) -> None:
        for position, spec in enumerate(self.wishlist.models):
            try:
                if spec.kind == "oci":
                    assert spec.image is not None
                    if not self.wanted(spec.image.registry, spec.image.repository):
                        continue
                    plan_oci(self, repo, scratch / f"model-{position}", spec)
                elif self.options.only_repositories is not None:
                    continue
                elif spec.kind == "mlflow":
                    plan_mlflow(self, repo, scratch / f"model-{position}", spec)
                else:
                    plan_folder(self, spec)
            except Exception as exc:  # this model fails, not the round
                self.fail("sync_model", spec.source, exc, model=spec.ref.key)

    def published_source(self, repo: Any, ref: ModelRef) -> dict[str, Any] | None:
        """``model.json``'s ``source`` of version ``ref`` as published, or None if absent."""
        try:
            entry = repo.stat(ref.path)
        except FileNotFoundError:
            return None
        if entry.is_symlink:
            raise PublishError(f"{ref} is an alias, not a version")
        return read_record(repo, ref).source

    def add_version(
        self, ref: ModelRef, folder: Path, pulled: Any, what: str, aliases: list[str]
    ) -> None:
        """Hash and describe a fetched model (``pulled``) or a local ``folder`` as ``ref``."""
        prepared = prepare_version(
            pulled.folder if pulled is not None else folder,
            ref,
            source=pulled.source if pulled is not None else None,
            description=pulled.description if pulled is not None else "",
            license=pulled.license if pulled is not None else None,
            extra=(pulled.extra or None) if pulled is not None else None,
            aliases=aliases,
            publisher_name="cvmfs-ml sync",
            known_sha256=known_file_digests(pulled.source) if pulled is not None else None,
        )
        self.plan.versions.append(prepared)
        self.log(
            "publish_model",
            image=what,
            model=str(ref),
            size_bytes=prepared.record.size,
            public_path=ref.path,
        )

    # -- commit ---------------------------------------------------------------------------------
    def commit(self) -> int:
        """Queue the plan in one transaction and commit; the number of changes."""
        plan = self.plan
        changes = 0
        with self.publisher.transaction() as txn:
            with open_published(self.publisher) as repo:
                batch = ModelBatch(txn, repo)
                for path in plan.removals:
                    txn.remove(path)
                    changes += 1
                for image in plan.images:
                    queue_image(
                        txn,
                        image.record,
                        image.manifest,
                        image.flat,
                        replace_link=image.replace_link,
                    )
                    changes += 1
                for record in plan.owners:
                    txn.add_bytes(f"{record.metadata}/{IMAGE_JSON}", record.to_bytes())
                    changes += 1
                if self.layers is not None and (self.layers.images or self.layers.dropped):
                    self.layers.queue(txn, repo, scratch_items)
                    changes += len(self.layers.new)
                    for digest in sorted(self.layers.new):
                        self.log("publish_layer", layer_digest=digest,
                                 private_path=layer_folder(digest))  # fmt: skip
                for prepared in plan.versions:
                    try:
                        _, added = batch.add_version(prepared)
                    except (CvmfsMlError, ValueError) as exc:
                        self.fail("publish_model", str(prepared.record.ref), exc)
                        continue
                    changes += int(added)
                    if not added:
                        self.log("skip_model", model=str(prepared.record.ref), reason="same bytes")
                for ref, alias in plan.aliases:
                    try:
                        moved = batch.set_alias(ref, alias)
                    except (CvmfsMlError, ValueError) as exc:
                        self.fail("alias_model", f"{ref.key}/{alias}", exc)
                        continue
                    if moved:
                        changes += 1
                        self.log("alias_model", model=str(ref), alias=alias)
                batch.finish()
            if changes:
                result = txn.commit(description=f"cvmfs-ml sync: {changes} change(s)")
                self.log("publish", revision=result.revision, changes=changes)
        return changes


def check_target(wishlist: Wishlist, publisher: Publisher) -> None:
    """The wishlist's ``cvmfs_repo`` (when it names one) is the repository synced into."""
    if wishlist.cvmfs_repo and wishlist.cvmfs_repo != publisher.fqrn:
        raise ConfigError(
            f"the wishlist is for {wishlist.cvmfs_repo!r}, the repository is {publisher.fqrn!r}:"
            " fix its cvmfs_repo or --repo"
        )


def run_round(
    publisher: Publisher,
    wishlist: Wishlist,
    options: SyncOptions | None = None,
    log: EventLog | None = None,
) -> RoundReport:
    """Sync ``wishlist`` into ``publisher``'s repository once (see the module docs)."""
    options = options or SyncOptions()
    log = log or EventLog()
    started = time.monotonic()
    check_target(wishlist, publisher)
    with sync_lock(publisher):
        before = publisher.manifest().revision
        log("start_sync", repository=publisher.fqrn, revision=before)
        work = _Round(publisher, wishlist, options, log)
        try:
            with round_scratch(options.scratch) as scratch:
                with open_published(publisher) as repo:
                    existing = read_image_records(repo)
                    keep = work.plan_images(repo, scratch, existing)
                    work.plan_models(repo, scratch)
                    if options.only_repositories is None:  # a webhook round removes nothing
                        work.plan_removals(repo, existing, keep)
                changes = 0
                if not work.plan.empty():
                    try:
                        changes = work.commit()
                    except (OSError, sqlite3.OperationalError) as exc:
                        if not is_disk_full(exc):
                            raise
                        raise _disk_full(publisher, options, log) from exc
        finally:
            work.close()
        after = publisher.manifest().revision
        state = work.state
        if work.plan.removals and after != before:
            state["gc_after_revision"] = after
        gc_removed = None
        pending = state.get("gc_after_revision")
        collectable = options.gc and publisher.settings.garbage_collection
        if collectable and pending is not None and after > int(pending):
            try:
                report = collect_garbage(publisher)
            except CvmfsMlError as exc:  # the round is published; gc is tried again next round
                log("gc", status="error", error=str(exc).splitlines()[0])
            else:
                gc_removed = report.removed
                state.pop("gc_after_revision", None)
                log("gc", removed=report.removed, size_bytes=report.bytes_removed)
        _save_state(publisher, state)
        report_ = RoundReport(
            before, after, changes, work.errors, time.monotonic() - started, gc_removed
        )
        log(
            "end_sync",
            status="error" if work.errors else "ok",
            revision=after,
            changes=changes,
            errors=work.errors,
            time_elapsed_s=round(report_.seconds, 3),
        )
        return report_
