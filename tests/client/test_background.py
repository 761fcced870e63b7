"""The read path's background pools: one per process, a working one again after a fork."""

from __future__ import annotations

import os

from cvmfs_ml.client.background import BackgroundPool


def test_one_pool_per_process_and_a_working_one_after_a_fork() -> None:
    pool = BackgroundPool("cvmfs-ml-test", 1)
    first = pool.get()
    assert first.submit(lambda: 6 * 7).result(timeout=30) == 42
    assert pool.get() is first  # reused, its thread started once
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool has no thread here
        code = 1
        try:
            mine = pool.get()
            if mine is not first and mine.submit(lambda: 1).result(timeout=30) == 1:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.get() is first
