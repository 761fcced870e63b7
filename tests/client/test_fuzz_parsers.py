"""Fuzzed parsers give only our errors, and nothing hangs (Hypothesis, deterministic profile).

Targets: ``.cvmfspublished`` (``Manifest.parse``, ``verify_manifest``), ``.cvmfswhitelist``
(``Whitelist.parse``, ``verify_whitelist``), the blacklist, the whole trust core
(``verify_ensemble``) and catalogs (arbitrary values in every column of real rows, and random
byte damage to the SQLite file). Inputs are both raw bytes and mutations of genuine files, so
the fuzzer gets past the first line check. Every example must either parse or raise a
:class:`~cvmfs_ml.errors.CvmfsMlError`; a per-test timeout catches a hang.
"""

from __future__ import annotations

import datetime as dt
import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_ml.client.trust import Blacklist, TrustAnchors, verify_ensemble
from cvmfs_ml.cvmfs.catalog import Catalog
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.cvmfs.manifest import Manifest, verify_manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, inflate, object_path
from cvmfs_ml.cvmfs.whitelist import Whitelist, verify_whitelist
from cvmfs_ml.errors import CvmfsMlError

FQRN = "ref.test.local"  # the reference repository (tests/conftest.py)
NOW = dt.datetime.now(dt.UTC)  # inside the reference whitelist's validity (until 2036)
FUZZ = settings(
    derandomize=True,  # the same examples on every run: CI cannot flake on a lucky draw
    max_examples=150,
    deadline=dt.timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def genuine(reference_repo: Path) -> dict[str, Any]:
    """Upstream's files (the reference repository), so every run mutates the same bytes.

    A repository made at test time has new keys and times on every run, and with them new
    examples: the fuzzer then found a new input on one run in many (a flake for CI).
    """
    folder = reference_repo / "cvmfs" / FQRN
    manifest = Manifest.parse((folder / ".cvmfspublished").read_bytes())
    assert manifest.certificate is not None
    files = {
        "manifest": (folder / ".cvmfspublished").read_bytes(),
        "whitelist": (folder / ".cvmfswhitelist").read_bytes(),
        "certificate": (
            folder / object_path(manifest.certificate, ObjectKind.CERTIFICATE)
        ).read_bytes(),
        "catalog": inflate(
            (folder / object_path(manifest.catalog, ObjectKind.CATALOG)).read_bytes()
        ),
        "keys": load_public_keys(reference_repo / "keys" / f"{FQRN}.pub"),
        "certificate_pem": (reference_repo / "keys" / f"{FQRN}.crt").read_bytes(),
    }
    # The unmutated files pass the whole trust core, so the fuzzer starts from a valid state
    # (a fixture grown too old would otherwise only test the expiry check, silently).
    verify_ensemble(TrustAnchors(FQRN, files["keys"]), files["manifest"], files["whitelist"],
                    files["certificate"], NOW)  # fmt: skip
    return files


def only_our_errors(call: Callable[[], object]) -> None:
    try:
        call()
    except CvmfsMlError:
        pass


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few random edits: flips, cuts, insertions, duplicated lines."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "line"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif action == "insert":
            data[at:at] = draw(st.binary(max_size=32))
        else:
            line = draw(st.sampled_from([b"--\n", b"\n", b"N" + b"x" * 300 + b"\n", b"E\n"]))
            data[at:at] = line
    return bytes(data)


def texts(original: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=2048), mutated(original))


# ------------------------------------------------------------------ manifest, whitelist, blacklist


@pytest.mark.timeout(300)
def test_manifest_parser(genuine: dict[str, Any]) -> None:
    @FUZZ
    @given(texts(genuine["manifest"]))
    def run(data: bytes) -> None:
        only_our_errors(lambda: Manifest.parse(data))
        only_our_errors(lambda: verify_manifest(data, genuine["certificate_pem"], fqrn=FQRN))

    run()


@pytest.mark.timeout(300)
def test_whitelist_parser(genuine: dict[str, Any]) -> None:
    @FUZZ
    @given(texts(genuine["whitelist"]))
    def run(data: bytes) -> None:
        only_our_errors(lambda: Whitelist.parse(data))
        only_our_errors(lambda: verify_whitelist(data, genuine["keys"], FQRN, NOW))

    run()


@pytest.mark.timeout(300)
def test_blacklist_parser() -> None:
    @FUZZ
    @given(st.binary(max_size=4096))
    def run(data: bytes) -> None:
        only_our_errors(lambda: Blacklist.parse(data))

    run()


@pytest.mark.timeout(300)
def test_trust_core(genuine: dict[str, Any]) -> None:
    anchors = TrustAnchors(FQRN, genuine["keys"])
    part = st.sampled_from(["manifest", "whitelist", "certificate"])

    @FUZZ
    @given(part, st.data())
    def run(which: str, data: st.DataObject) -> None:
        inputs = {k: genuine[k] for k in ("manifest", "whitelist", "certificate")}
        inputs[which] = data.draw(texts(genuine[which]))
        only_our_errors(
            lambda: verify_ensemble(
                anchors, inputs["manifest"], inputs["whitelist"], inputs["certificate"], NOW
            )
        )

    run()


# ------------------------------------------------------------------ catalogs

_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.sampled_from(["", ".", "..", "a/b", "x\0y", "/", "b.txt"]),
)
_COLUMNS = ("hardlinks", "hash", "size", "mode", "mtime", "flags", "symlink", "uid", "gid",
            "name", "xattr", "parent_1", "parent_2")  # fmt: skip


def read_everything(path: Path) -> None:
    """Every reader path of a catalog, bounded (a loop would exhaust the islice, not us)."""
    catalog = Catalog(path, "")
    try:
        entries = list(itertools.islice(catalog.entries(), 1000))
        for entry in entries:
            catalog.lookup(entry.path)
            if entry.is_chunked:
                catalog.chunks(entry)
        catalog.nested_catalogs()
        catalog.statistics()
        _ = catalog.revision, catalog.ttl, catalog.previous_revision
    finally:
        catalog.close()


@pytest.mark.timeout(300)
def test_catalog_rows(genuine: dict[str, Any], tmp_path: Path) -> None:
    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(_COLUMNS), _VALUES), min_size=1, max_size=4),
           st.integers(0, 10))  # fmt: skip
    def run(changes: list[tuple[str, object]], row: int) -> None:
        path = tmp_path / "rows.db"
        path.write_bytes(genuine["catalog"])
        with sqlite3.connect(path) as db:
            rowids = [r[0] for r in db.execute("SELECT rowid FROM catalog ORDER BY rowid")]
            target = rowids[row % len(rowids)]
            for column, value in changes:
                db.execute(f"UPDATE catalog SET {column} = ? WHERE rowid = ?", (value, target))
        db.close()
        only_our_errors(lambda: read_everything(path))

    run()


@pytest.mark.timeout(300)
def test_catalog_bytes(genuine: dict[str, Any], tmp_path: Path) -> None:
    @FUZZ
    @given(mutated(genuine["catalog"]))
    def run(data: bytes) -> None:
        path = tmp_path / "bytes.db"
        path.write_bytes(data)
        only_our_errors(lambda: read_everything(path))

    run()
