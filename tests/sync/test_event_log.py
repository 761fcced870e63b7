"""A long-running sync service keeps its latest events in memory and every event in its file."""

from __future__ import annotations

import json
from pathlib import Path

from cvmfs_ml.sync.events import EventLog


def test_the_latest_events_stay_in_memory_and_all_go_to_the_file(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl", max_kept=3)
    for i in range(10):
        log("sync_image", image=f"reg/img:{i}", status="ok")
    assert [e.image for e in log.events] == ["reg/img:7", "reg/img:8", "reg/img:9"]
    log.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == [f"reg/img:{i}" for i in range(10)]


def _images(path: Path) -> list[str]:
    return [json.loads(line)["image"] for line in path.read_text().splitlines()]


def test_logrotate_without_copytruncate(tmp_path: Path) -> None:
    """logrotate renames the file (and with ``create`` makes a new one): the events went on
    into the renamed file for as long as the service ran. The file is opened again when its
    path no longer names the file open, as logging's WatchedFileHandler does."""
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    try:
        log("sync_image", image="before")
        path.rename(tmp_path / "events.jsonl.1")  # rotate, with 'create'
        path.touch()
        log("sync_image", image="after create")
        path.rename(tmp_path / "events.jsonl.2")  # rotate, without 'create'
        log("sync_image", image="after rename")
        log("sync_image", image="again")
    finally:
        log.close()
    assert _images(tmp_path / "events.jsonl.1") == ["before"]
    assert _images(tmp_path / "events.jsonl.2") == ["after create"]
    assert _images(path) == ["after rename", "again"]
