"""Waiting for a condition with a deadline: the one polling loop the tests share.

CI runs on a loaded 2-core machine, so a test never sleeps for an assumed time; it polls a
condition until it holds or the deadline passes, then fails saying what did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    condition: Callable[[], Any],
    timeout: float,
    what: Callable[[], str] | str = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
    interval: float = 0.05,
) -> Any:
    """Poll ``condition`` until it returns something true and return that; an exception of
    ``ignore`` counts as "not yet". After ``timeout`` seconds: AssertionError with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except ignore:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"not within {timeout:g} s: {detail}")
        time.sleep(interval)


class ManualClock:
    """A stand-in for the ``time`` module of code under test whose clock only the test moves
    (``now``): a delay passes when the test says so, never because a loaded machine was slow.
    ``sleep`` is the real one (backoffs still pause; they do not read this clock), and so is
    ``time`` (wall time, compared with files' real mtimes)."""

    sleep = staticmethod(time.sleep)
    time = staticmethod(time.time)

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now  # whole numbers: steps add up exactly

    def monotonic(self) -> float:
        return self.now
