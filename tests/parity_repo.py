"""A repository holding what upstream's client shows in its own way (issue 8, item 5).

Published with the engine; the cases the publisher does not write (external files, the hidden
flag, a name that is not UTF-8) are made by editing the published root catalog's rows and
publishing that catalog as the next revision (``Transaction.start_from``), so the result is a
properly signed revision with consistent counters.

Layout (``FQRN``)::

    /hep/tagger/1/tagger.onnx        regular file
    /hep/tagger/prod -> 1            alias, and latest -> prod (a chain)
    /hep/tagger/loop -> loop         a loop
    /hep/tagger/escape -> ../../..   climbs out of the repository
    /links/abs -> /etc/hostname      absolute, outside the repository
    /links/abs-in -> /cvmfs/<FQRN>/hep/tagger/1/tagger.onnx
    /links/variant -> $(PARITY_SITE:-default)/conf.txt
    /links/bare -> x$(PARITY_UNSET)y
    /links/{default,cern}/conf.txt
    /links/hard-a, /links/hard-b     one hard-link group (two members)
    /ext/big.bin, /ext/small.txt     external files (flag 128; big.bin chunked)
    /dev/null, /dev/sda, /dev/fifo   char device (1, 3), block device (8, 0), FIFO
    /names/caf\\xe9.txt               a latin-1 name (not UTF-8)
    /hidden.txt                      flag 0x8000
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvmfs_ml.cvmfs.catalog import Flag
from cvmfs_ml.cvmfs.hashing import md5_pair
from cvmfs_ml.cvmfs.objects import Compression, ObjectKind, deflate, object_path
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.publish.sources import SourceItem

FQRN = "parity.test"
EXTERNAL_DIR = "extdata"  # served at <server>/cvmfs/extdata/<repository path>
LATIN1_NAME = b"caf\xe9.txt"
HARDLINKS = ("/links/hard-a", "/links/hard-b")
CHAR_DEV = os.makedev(1, 3)
BLOCK_DEV = os.makedev(8, 0)


@dataclass(frozen=True)
class ParityRepo:
    root: Path  # served root: <root>/cvmfs/<FQRN>, <root>/cvmfs/extdata
    repo_dir: Path
    public_key: Path
    tree: Path  # the published files, by repository path

    def original(self, path: str) -> bytes:
        return (self.tree / path.lstrip("/")).read_bytes()


def _tree(tree: Path) -> None:
    rng = np.random.default_rng(8)
    version = tree / "hep" / "tagger" / "1"
    version.mkdir(parents=True)
    (version / "tagger.onnx").write_bytes(rng.integers(0, 256, 300_001, np.uint8).tobytes())
    os.symlink("1", tree / "hep" / "tagger" / "prod")
    os.symlink("prod", tree / "hep" / "tagger" / "latest")
    os.symlink("loop", tree / "hep" / "tagger" / "loop")
    os.symlink("../../..", tree / "hep" / "tagger" / "escape")
    links = tree / "links"
    for site in ("default", "cern"):
        (links / site).mkdir(parents=True)
        (links / site / "conf.txt").write_text(f"site={site}\n")
    os.symlink("/etc/hostname", links / "abs")
    os.symlink(f"/cvmfs/{FQRN}/hep/tagger/1/tagger.onnx", links / "abs-in")
    os.symlink("$(PARITY_SITE:-default)/conf.txt", links / "variant")
    os.symlink("x$(PARITY_UNSET)y", links / "bare")
    for name in ("hard-a", "hard-b"):
        (links / name).write_text("one file, two names\n")
    (tree / "ext").mkdir()
    (tree / "ext" / "big.bin").write_bytes(rng.integers(0, 256, 3_000_017, np.uint8).tobytes())
    (tree / "ext" / "small.txt").write_text("external and small\n")
    (tree / "names").mkdir()
    (tree / "names" / "cafe.txt").write_text("latin-1 name\n")
    (tree / "hidden.txt").write_text("hidden\n")


def _devices() -> list[SourceItem]:
    now = int(time.time())
    return [
        SourceItem("/dev", stat.S_IFDIR | 0o755, now, size=4096),
        SourceItem("/dev/null", stat.S_IFCHR | 0o666, now, rdev=CHAR_DEV),
        SourceItem("/dev/sda", stat.S_IFBLK | 0o660, now, rdev=BLOCK_DEV),
        SourceItem("/dev/fifo", stat.S_IFIFO | 0o644, now),
    ]


def rewrite_root_catalog(publisher: Publisher, edit: Callable[[sqlite3.Connection], None]) -> None:
    """Publish the current root catalog with ``edit`` applied to its rows as a new revision."""
    manifest = publisher.manifest()
    raw = publisher.store.fetch(
        object_path(manifest.catalog, ObjectKind.CATALOG), manifest.catalog, compressed=True
    )
    work = publisher.repo_dir.parent / "catalog-edit.sqlite"
    work.write_bytes(raw)
    db = sqlite3.connect(work)
    try:
        edit(db)
        db.commit()
    finally:
        db.close()
    digest = publisher.store.put_object(
        deflate(work.read_bytes(), Compression.ZLIB), ObjectKind.CATALOG, manifest.catalog.algorithm
    )
    work.unlink()
    with publisher.transaction() as txn:
        txn.start_from(digest)
        txn.commit()


def _set_flags(db: sqlite3.Connection, path: str, add: int) -> None:
    done = db.execute(
        "UPDATE catalog SET flags = flags | ? WHERE md5path_1 = ? AND md5path_2 = ?",
        (int(add), *md5_pair(path)),
    ).rowcount
    assert done == 1, path


def _external_objects(db: sqlite3.Connection, path: str) -> list[tuple[bytes, str]]:
    """(raw hash, object suffix) of every object a file's row or chunks name."""
    key = md5_pair(path)
    rows = [
        (bytes(h), "P")
        for (h,) in db.execute("SELECT hash FROM chunks WHERE md5path_1 = ? AND md5path_2 = ?", key)
    ]
    (whole,) = db.execute(
        "SELECT hash FROM catalog WHERE md5path_1 = ? AND md5path_2 = ?", key
    ).fetchone()
    return rows + ([(bytes(whole), "")] if whole else [])


def publish_parity_repo(base: Path) -> ParityRepo:
    tree = base / "tree"
    _tree(tree)
    settings = PublishSettings(
        compression=Compression.NONE, min_chunk_size=256 * 1024, avg_chunk_size=512 * 1024,
        max_chunk_size=1024 * 1024, workers=2,
    )  # fmt: skip
    root = base / "srv"
    publisher = create_repository(root / "cvmfs", FQRN, keys_dir=base / "keys", settings=settings)
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.add_items(_devices, "/dev")
        txn.commit()

    external_objects: list[tuple[bytes, str]] = []

    def edit(db: sqlite3.Connection) -> None:
        for path in ("/ext/big.bin", "/ext/small.txt"):
            _set_flags(db, path, Flag.EXTERNAL)
            external_objects.extend(_external_objects(db, path))
        _set_flags(db, "/hidden.txt", Flag.HIDDEN)
        for path in HARDLINKS:  # group 1 of this catalog, two members (§4.3)
            db.execute(
                "UPDATE catalog SET hardlinks = ? WHERE md5path_1 = ? AND md5path_2 = ?",
                ((1 << 32) | len(HARDLINKS), *md5_pair(path)),
            )
        old, new = "/names/cafe.txt", b"/names/" + LATIN1_NAME
        db.execute(
            "UPDATE catalog SET name = CAST(? AS TEXT), md5path_1 = ?, md5path_2 = ? "
            "WHERE md5path_1 = ? AND md5path_2 = ?",
            (LATIN1_NAME, *md5_pair(new), *md5_pair(old)),
        )

    rewrite_root_catalog(publisher, edit)
    # Once more, so that no tagged revision (trunk, trunk-previous) has the files in data/.
    rewrite_root_catalog(publisher, lambda db: None)
    assert len(external_objects) >= 3  # big.bin has several chunks
    # External data is not in data/: a client that looks there fails.
    for raw, suffix in external_objects:
        hex_digest = raw.hex()
        (publisher.repo_dir / "data" / hex_digest[:2] / (hex_digest[2:] + suffix)).unlink()
    external = root / "cvmfs" / EXTERNAL_DIR / "ext"
    external.mkdir(parents=True)
    for name in ("big.bin", "small.txt"):
        shutil.copyfile(tree / "ext" / name, external / name)
    # The tree mirrors the repository: the renamed file under its real (latin-1) name.
    os.rename(tree / "names" / "cafe.txt", tree / "names" / os.fsdecode(LATIN1_NAME))
    return ParityRepo(root, publisher.repo_dir, publisher.keys.paths.master_public, tree)
