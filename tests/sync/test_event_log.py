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
