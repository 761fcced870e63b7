"""Signed but hostile repositories: one SQLite object of a published revision spoiled with SQL.

A signature says who signed, not that the bytes are sane: the publisher (or whoever holds its
key) can sign anything. :func:`publish_spoiled` takes the root catalog or the history database
of a repository's current revision, applies SQL to it, stores it, and signs the next revision's
manifest naming it with the repository's own key, so every reader verifies it as genuine.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

from cvmfs_ml.cvmfs.hashing import Algorithm
from cvmfs_ml.cvmfs.manifest import sign_manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, deflate, inflate, object_path
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.storage.local import LocalStore

__all__ = ["publish_spoiled"]


def publish_spoiled(
    publisher: Publisher, scratch: Path, kind: ObjectKind, sql: str, args: tuple = ()
) -> None:
    """Publish, signed, the current revision with ``sql`` applied to its root catalog
    (``ObjectKind.CATALOG``) or history database (``ObjectKind.HISTORY``). A catalog's
    counters are left as they were."""
    store = LocalStore(publisher.repo_dir)
    manifest = publisher.manifest()
    field = {ObjectKind.CATALOG: "catalog", ObjectKind.HISTORY: "history"}[kind]
    digest = getattr(manifest, field)
    assert digest is not None
    plain = scratch / f"spoiled-{field}.db"
    plain.write_bytes(inflate(store.get_bytes(object_path(digest, kind))))
    with sqlite3.connect(plain) as db:
        db.execute(sql, args)
    db.close()
    spoiled = store.put_object(deflate(plain.read_bytes()), kind, Algorithm.SHA1)
    changes: dict[str, object] = {field: spoiled, "revision": manifest.revision + 1}
    if kind is ObjectKind.CATALOG:
        changes["catalog_size"] = plain.stat().st_size
    body = dataclasses.replace(manifest, **changes).body()  # type: ignore[arg-type]
    store.put_bytes(".cvmfspublished", sign_manifest(body, publisher.keys.repo_private))
