"""What open upload sessions hold on the disk, and when they go: abandoned ones pruned while
the registry runs, whether or not sessions start.

Before, the running registry looked for abandoned sessions only when a new one started, so a
registry nobody opened sessions on any more kept its stale ones (and their disk) for ever.
"""

from __future__ import annotations

import os
import time as real_time
from pathlib import Path

import pytest

from cvmfs_ml.registry.oci_store import PRUNE_SECONDS, OciStore
from waiting import ManualClock, wait_until

WEEK_AGO = real_time.time() - 8 * 86400


def _age(store: OciStore, upload_id: str) -> None:
    """The session's files as a session nobody wrote to for over a week leaves them."""
    for path in store.uploads.glob(f"{upload_id}*"):
        os.utime(path, (WEEK_AGO, WEEK_AGO))


def test_abandoned_sessions_are_pruned_periodically_without_new_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvmfs_ml.registry.oci_store.time", clock := ManualClock())
    monkeypatch.setattr("cvmfs_ml.registry.oci_store.PRUNE_TICK", 0.01, raising=False)
    store = OciStore(tmp_path / "oci")
    try:
        old, kept = store.start_upload("w", 10), store.start_upload("w", 10)
        _age(store, old)
        assert store.upload_size(old) == 0
        clock.now += PRUNE_SECONDS  # an hour later, and no session starts
        wait_until(lambda: not list(store.uploads.glob(f"{old}*")), 60,
                   "an abandoned session was kept: no new session started")  # fmt: skip
        assert store.upload_size(kept) == 0
    finally:
        store.close()
