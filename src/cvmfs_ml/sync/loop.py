"""The sync daemon: a round every ``interval`` seconds, and at once when a registry notifies.

The wishlist is read again before every round (DUCC's ``loop`` does the same), so editing it
needs no restart; a wishlist broken by an edit is an ``error`` event and the loop carries on
with the next round. So is the registry auth file (``SyncOptions.auth``, when it came from a
file or the default lookup), so rotated credentials need no restart either, nor a ``docker
login`` after the start (the lookup runs again) or a removed file (its credentials go with it);
an auth file broken by an edit is one ``read_auth`` error event per round, and the round goes
on with the credentials last read. A webhook call wakes the loop and runs a round limited to
the repositories it names; the full round still comes every ``interval``, and at once after a
delete event (removals, with their grace period, are decided in full rounds only).

Counters (``cvmfs_ml_sync_rounds_total``, ``..._changes_total``, ``..._errors_total``,
``..._last_revision``) are registered in a Prometheus registry when one is given, so a service
hosting the loop exposes them with its other metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError, CvmfsMlError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.auth import AuthFile
from cvmfs_ml.sync.engine import RoundReport, SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.webhook import RegistryEvent
from cvmfs_ml.sync.wishlist import load_wishlist

__all__ = ["SyncLoop", "round_failure"]


def round_failure(report: RoundReport | None) -> str | None:
    """What failed in a round (``None`` if nothing did): the round as a whole (no report), or
    how many of its items. One-shot ``sync`` and ``--loop --rounds`` exit 1 on it."""
    if report is None:
        return "the round"
    return f"{report.errors} item(s)" if report.errors else None


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.rounds = Counter("cvmfs_ml_sync_rounds", "sync rounds run", registry=registry)
        self.changes = Counter("cvmfs_ml_sync_changes", "changes published", registry=registry)
        self.errors = Counter("cvmfs_ml_sync_errors", "items that failed", registry=registry)
        self.revision = Gauge(
            "cvmfs_ml_sync_last_revision", "revision after the last round", registry=registry
        )

    def record(self, report: RoundReport) -> None:
        self.rounds.inc()
        self.changes.inc(report.changes)
        self.errors.inc(report.errors)
        self.revision.set(report.revision_after)


_logger = logging.getLogger(__name__)
MAX_KEPT_REPORTS = 100
MAX_PENDING = 1000  # repositories remembered for a limited round; more: a full round instead


class SyncLoop:
    def __init__(
        self,
        publisher: Publisher,
        wishlist: Path,
        *,
        interval: float = 300.0,
        options: SyncOptions | None = None,
        log: EventLog | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        metrics_registry: Any = None,
    ) -> None:
        self.publisher = publisher
        self.wishlist = Path(wishlist)
        self.interval = max(0.0, float(interval))
        self.options = options or SyncOptions()
        self.log = log or EventLog()
        self.on_round = on_round
        self.metrics = _Metrics(metrics_registry) if metrics_registry is not None else None
        # The latest rounds (a service runs for months; each round's report is also an event)
        self.reports: deque[RoundReport] = deque(maxlen=MAX_KEPT_REPORTS)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._full_now = False
        self.rounds_run = 0  # full or webhook-triggered, failed or not
        self.rounds_failed = 0
        self.last_failure: str | None = None  # round_failure() of the latest round

    def notify(self, events: list[RegistryEvent]) -> None:
        """Webhook callback: remember the repositories and wake the loop."""
        with self._lock:
            for event in events:
                if event.action == "delete":  # removals happen in full rounds only
                    self._full_now = True
                elif len(self._pending) < MAX_PENDING:
                    self._pending.add(event.repository)
                else:  # a sender naming repositories without end: a full round covers them
                    self._full_now = True
                self.log("webhook", image=f"{event.registry}/{event.repository}:{event.tag}",
                         event=event.action)  # fmt: skip
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _take_pending(self) -> frozenset[str]:
        with self._lock:
            pending, self._pending = frozenset(self._pending), set()
        return pending

    def run_once(self, only: frozenset[str] | None = None) -> RoundReport | None:
        """One round (limited to the repositories ``only`` names); ``None`` if it failed whole."""
        report = self._round(only)
        self.rounds_run += 1
        self.last_failure = round_failure(report)
        self.rounds_failed += self.last_failure is not None
        return report

    def _round(self, only: frozenset[str] | None) -> RoundReport | None:
        try:
            wishlist = load_wishlist(self.wishlist)
            options = replace(self.options, only_repositories=only, auth=self._read_auth())
            report = run_round(self.publisher, wishlist, options, self.log)
        except (CvmfsMlError, OSError) as exc:  # the loop goes on: the next round may heal it
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.log("sync_round", status="error", error=message)
            return None
        except Exception as exc:  # a bug, or an input that no check knows yet
            # A service that feeds a repository must outlive a round that fails this way: the
            # error is an event (and counts on the metrics), the traceback goes to the debug
            # log for whoever looks into it, and the next round runs as planned.
            _logger.debug("sync round failed", exc_info=True)
            first = str(exc).splitlines()[0] if str(exc) else ""
            error = f"internal error (please report): {type(exc).__name__}: {first}"
            self.log("sync_round", status="error", error=error)
            if self.metrics is not None:
                self.metrics.errors.inc()
            return None
        self.reports.append(report)
        if self.metrics is not None:
            self.metrics.record(report)
        if self.on_round is not None:
            self.on_round(report)
        return report

    def _read_auth(self) -> AuthFile:
        """The auth file as it is now (credentials are rotated, ``docker login`` writes one,
        a file is removed); if an edit broke it, the credentials read before, with one error
        event. A change of the file the credentials come from is one ``read_auth`` event."""
        before = self.options.auth
        try:
            self.options = replace(self.options, auth=before.reload())
        except ConfigError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.log("read_auth", status="error",
                     error=f"{first}; using the last good credentials read from it until it is "
                     "fixed")  # fmt: skip
        now = self.options.auth
        if now.in_use != before.in_use:
            self.log("read_auth", auth_file=str(now.in_use or ""), registries=len(now.entries))
        return now

    def run(self, *, rounds: int | None = None) -> None:
        """Loop until :meth:`stop` (or ``rounds`` rounds, full or webhook-triggered).

        A registry may notify before the pushed tag can be read (distribution sends the event
        when the manifest is stored, then writes the tag), so a webhook round that changed
        nothing or failed is tried again after 1, 2 and 4 seconds.
        """
        done = 0
        next_full = time.monotonic()
        retry_at: float | None = None
        retry: frozenset[str] = frozenset()
        attempts = 0
        while not self._stop.is_set() and (rounds is None or done < rounds):
            if time.monotonic() >= next_full:
                self._take_pending()  # a full round covers them
                retry_at, attempts = None, 0
                next_full = time.monotonic() + self.interval
                self.run_once()
                done += 1
                continue
            wake_at = next_full if retry_at is None else min(next_full, retry_at)
            self._wake.wait(timeout=max(0.0, wake_at - time.monotonic()))
            self._wake.clear()
            with self._lock:
                if self._full_now:
                    self._full_now, next_full = False, time.monotonic()
            if time.monotonic() >= next_full:
                continue
            pending = self._take_pending()
            if pending:
                attempts = 0  # a fresh notification starts a fresh series
            elif retry_at is not None and time.monotonic() >= retry_at:
                pending, retry_at = retry, None
            if not pending or self._stop.is_set():
                continue
            report = self.run_once(pending)
            done += 1
            if (report is None or report.errors or not report.changes) and attempts < 3:
                retry, retry_at = pending, time.monotonic() + 2.0**attempts
                attempts += 1
