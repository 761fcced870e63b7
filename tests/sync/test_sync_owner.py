"""Which wishlist removes an image that left it: the one named in ``image.json``'s ``owner``.

The owner was the wishlist file's path, so a wishlist moved or renamed (a new config layout, a
git checkout elsewhere) never removed what it had published, and a new, unrelated wishlist put
at the old path would have taken its images for its own. A wishlist now says who it is
(``name:``), which moves with the file; records written under the path are taken over by the
named wishlist at that path. Real parts: Debian's docker-registry on loopback, skopeo pushes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.images import IMAGE_JSON, metadata_folder
from cvmfs_ml.sync.wishlist import load_wishlist, parse_wishlist
from sync.imagebuild import FQRN, published
from sync.model_helpers import push_small_image

pytestmark = pytest.mark.service

GRACE = SyncOptions(grace_seconds=3600)  # an image that left the wishlist stays, scheduled
NOW = SyncOptions(grace_seconds=0)  # the grace period is over


def _write(path: Path, host: str, tags: list[str], name: str | None = None) -> Path:
    lines = "".join(f"  - 'http://{host}/lib/app:{tag}'\n" for tag in tags)
    named = f"name: {name}\n" if name else ""
    path.write_text(f"version: 1\n{named}cvmfs_repo: {FQRN}\ninput:\n{lines}")
    return path


def _round(publisher: Publisher, path: Path, options: SyncOptions) -> tuple[Any, EventLog]:
    log = EventLog()
    report = run_round(publisher, load_wishlist(path), options, log)
    assert report.errors == 0, [e.error for e in log.events if e.status == "error"]
    return report, log


def _there(publisher: Publisher, host: str) -> set[str]:
    """The tags of ``lib/app`` whose public link is published."""
    with published(publisher) as repo:
        try:
            names = [e.name for e in repo.listdir(f"/{host}/lib")]
        except FileNotFoundError:
            return set()
    return {n.split(":", 1)[1] for n in names if n.startswith("app:")}


def _owner(publisher: Publisher, host: str, tag: str) -> str:
    with published(publisher) as repo:
        raw = repo.read_bytes(f"{metadata_folder(host, 'lib/app', tag)}/{IMAGE_JSON}")
    return str(json.loads(raw)["owner"])


@pytest.fixture
def host(docker_registry: Any, tmp_path: Path) -> str:
    for tag in ("1", "2", "3"):
        push_small_image(docker_registry.host, tmp_path, "lib/app", tag)
    return str(docker_registry.host)


def test_a_moved_wishlist_removes_what_left_it_and_no_other_does(
    host: str, publisher: Publisher, tmp_path: Path
) -> None:
    a, b = tmp_path / "a" / "wishlist.yaml", tmp_path / "b" / "renamed.yaml"
    a.parent.mkdir()
    b.parent.mkdir()
    _write(a, host, ["1", "2"], name="physics")
    assert _round(publisher, a, GRACE)[0].committed
    assert _owner(publisher, host, "1") == "physics"

    os.replace(a, b)  # moved and renamed
    _write(b, host, ["1"], name="physics")  # with image 2 taken out
    _, log = _round(publisher, b, GRACE)
    assert [e.public_path for e in log.events if e.action == "schedule_removal"] == [
        f"/{host}/lib/app:2"
    ]
    assert _there(publisher, host) == {"1", "2"}  # not before the grace period is over

    # An unrelated wishlist, at the old path or unnamed elsewhere, never takes them for its own.
    for other in (_write(a, host, ["3"]), _write(tmp_path / "c.yaml", host, ["3"], "other")):
        _round(publisher, other, NOW)
        assert {"1", "2"} <= _there(publisher, host)

    report, log = _round(publisher, b, NOW)
    assert report.committed
    assert [e.public_path for e in log.events if e.action == "remove_image"] == [
        f"/{host}/lib/app:2"
    ]
    assert _there(publisher, host) == {"1", "3"}


def test_records_written_under_the_path_are_taken_over_by_the_named_wishlist_there(
    host: str, publisher: Publisher, tmp_path: Path
) -> None:
    """A wishlist that published before it had a name (its records name its path) is given
    one where it is: its round takes its records over (their ``owner`` becomes the name, in
    one revision), and from then on it may move. A named wishlist elsewhere takes nothing."""
    a, b = tmp_path / "wishlist.yaml", tmp_path / "moved" / "wishlist.yaml"
    b.parent.mkdir()
    _write(a, host, ["1", "2"])
    assert _round(publisher, a, GRACE)[0].committed
    assert _owner(publisher, host, "1") == str(a.resolve())  # the old key

    _write(tmp_path / "other.yaml", host, ["3"], name="other")
    _round(publisher, tmp_path / "other.yaml", NOW)
    assert _owner(publisher, host, "1") == str(a.resolve())  # not the other's

    _write(a, host, ["1", "2"], name="physics")
    report, _ = _round(publisher, a, GRACE)
    assert report.committed
    assert _owner(publisher, host, "1") == _owner(publisher, host, "2") == "physics"
    assert not _round(publisher, a, GRACE)[0].committed  # taken over once

    os.replace(a, b)
    _write(b, host, ["1"], name="physics")
    _round(publisher, b, GRACE)
    _round(publisher, b, NOW)
    assert _there(publisher, host) == {"1", "3"}


def test_a_wishlist_name_is_checked() -> None:
    for bad in ("''", "[a]", "'/etc/wishlist.yaml'", "'a b'", "x" * 129):
        with pytest.raises(ConfigError, match="'name'"):
            parse_wishlist(f"version: 1\nname: {bad}\ninput: ['r.example/a:1']\n")
    named = parse_wishlist("version: 1\nname: physics-2.0_a\ninput: ['r.example/a:1']\n")
    assert named.origin == "physics-2.0_a"
