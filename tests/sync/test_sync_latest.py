"""``latest`` of a model synced from tags is the newest version, in natural order.

``docs/sync.md``: versions from tags, ``latest`` following the newest (``v10`` after ``v9``).
It followed the newest of the versions added *in the round*: an older tag synced later (one
that failed before, a pattern widened to older tags, a registry replicated out of order) moved
``latest`` back to it, so whoever asks for ``latest`` got an older model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.wishlist import parse_wishlist
from sync.imagebuild import FQRN, published
from sync.model_helpers import oras_push

pytestmark = pytest.mark.service


def test_an_older_tag_synced_later_does_not_move_latest_back(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    host = docker_registry.host
    wishlist = parse_wishlist(
        f"version: 1\ncvmfs_repo: {FQRN}\nmodels:\n"
        f"  - source: http://{host}/ml/net:v*\n    name: hep/net\n"
    )
    for tag in ("v1", "v10"):
        oras_push(host, f"ml/net:{tag}", {"w.bin": tag.encode()}, tmp_path / tag)
    assert run_round(publisher, wishlist, None, EventLog()).errors == 0
    with published(publisher) as repo:
        assert repo.readlink("/hep/net/latest") == "v10"

    oras_push(host, "ml/net:v9", {"w.bin": b"v9"}, tmp_path / "v9")  # older, synced later
    report = run_round(publisher, wishlist, None, EventLog())
    assert report.errors == 0 and report.committed
    with published(publisher) as repo:
        assert repo.exists("/hep/net/v9/w.bin")
        assert repo.readlink("/hep/net/latest") == "v10"

    oras_push(host, "ml/net:v11", {"w.bin": b"v11"}, tmp_path / "v11")  # newer: it moves
    assert run_round(publisher, wishlist, None, EventLog()).errors == 0
    with published(publisher) as repo:
        assert repo.readlink("/hep/net/latest") == "v11"
