"""What a registry's refusals may hold: a round ends, and in bounded memory, whatever it sends.

A refusal (403, 503, 401) comes with a body nobody needs beyond its first line. A sync round
read it whole into memory to quote it (``response.data``), and urllib3 read every byte of it
to reuse the connection before each retry (``drain_conn``): a body of a GiB cost a GiB, and one
without end held the round, and the service, for ever. The registry here (loopback, tests'
``HostileRegistry``) answers a manifest that way and counts what it managed to send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from cvmfs_ml.errors import CvmfsMlError, DownloadError
from cvmfs_ml.models.sources.oci_client import RegistryClient
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import SyncOptions, run_round
from cvmfs_ml.sync.events import EventLog
from cvmfs_ml.sync.wishlist import parse_wishlist
from hostile_registry import IMAGE_CONFIG, HostileRegistry, image_manifest
from sync.imagebuild import FQRN, published
from waiting import wait_until

pytestmark = pytest.mark.service

BIG = 256 * 2**20
READ_AT_MOST = 32 * 2**20  # what may go into socket buffers before the client closes
IMAGE = {"mediaType": IMAGE_CONFIG, "digest": "sha256:" + "ab" * 32, "size": 100}


def _ends(registry: HostileRegistry, call: Callable[[], Any], what: str) -> Any:
    """What ``call()`` returned or raised (a CvmfsMlError), run on a thread so that a call that
    never ends fails the test after 30 s instead of hanging it; then the registry lets go."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except CvmfsMlError as exc:
            out["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: out, 30, lambda: f"{what} to end (sent: {registry.sent})")
    finally:
        registry.release.set()  # an old round or client, held, lets go as the test ends
        thread.join(timeout=5)  # one sleeping on is left to its daemon thread
    return out["result"]


def _round(publisher: Publisher, registry: HostileRegistry) -> tuple[Any, list[Any]]:
    """A round for ``lib/app:1``: its report and its error events (not ``end_sync``'s)."""
    text = f"version: 1\ncvmfs_repo: {FQRN}\ninput: ['http://{registry.host}/lib/app:1']\n"
    log = EventLog()
    report = _ends(
        registry, lambda: run_round(publisher, parse_wishlist(text), SyncOptions(), log), "round"
    )
    return report, [e for e in log.events if e.status == "error" and e.action != "end_sync"]


def _manifest(registry: HostileRegistry) -> Any:
    """``lib/app:1`` fetched by a client with a 2 s timeout, or the error."""
    with RegistryClient(registry.host, plain_http=True, timeout=2.0) as client:
        return _ends(registry, lambda: client.get_manifest("lib/app", "1"), "the manifest")


@pytest.mark.parametrize(
    ("status", "size"),
    [(403, BIG), (503, None), (401, None)],
    ids=["refused-with-a-GiB", "unavailable-without-end", "unauthorized-without-end"],
)
def test_a_refusal_with_a_huge_or_endless_body_ends_the_entry(
    publisher: Publisher, status: int, size: int | None
) -> None:
    with HostileRegistry() as registry:
        registry.bodies["1"] = (status, size)
        report, errors = _round(publisher, registry)
        sent = registry.sent.get("1", 0)
    assert report.errors == 1 and not report.committed
    assert [e.action for e in errors] == ["convert_image"]
    assert str(status) in errors[0].error and len(errors[0].error) < 600
    assert sent < READ_AT_MOST, f"{sent} bytes of the refusal were read"
    with published(publisher) as repo:
        assert not repo.exists(f"/{registry.host}")


def test_a_manifest_sent_a_byte_at_a_time_fails_on_the_low_speed_rule() -> None:
    """A manifest (or a tag list, or a token) read with the socket's timeout only: a registry
    sending a byte every half a second (each receive well within the timeout) held the round
    for as long as the document lasted, a 16 MiB one for three months. Those reads now go
    through the blobs' low-speed rule: under 1 KiB/s averaged over ``timeout`` seconds fails."""
    with HostileRegistry() as registry:
        registry.manifest("lib/app", "1", image_manifest(IMAGE, [IMAGE] * 40))
        registry.trickled["1"] = 0.5
        error = _manifest(registry)
    assert isinstance(error, DownloadError), error
    assert "low-speed" in str(error)


def test_a_manifest_cut_off_is_that_images_error(publisher: Publisher) -> None:
    """A manifest whose connection closed before its announced length came was urllib3's
    ProtocolError, outside the error tree: the round called it an internal error and asked
    for a report. It is the image's download error, saying what happened."""
    with HostileRegistry() as registry:
        registry.manifest("lib/app", "1", image_manifest(IMAGE, [IMAGE]))
        registry.truncated.add("1")
        _, errors = _round(publisher, registry)
    assert [e.action for e in errors] == ["convert_image"]
    assert "internal error" not in errors[0].error
    assert "manifest" in errors[0].error and "IncompleteRead" in errors[0].error


def test_a_retry_after_of_hours_is_waited_for_the_timeout_at_most() -> None:
    """A 503 saying ``Retry-After: 21600`` held the request six hours per retry (urllib3's own
    ceiling), three retries: a round, and the service, held for 18 hours. The wait is now
    the client's timeout at most (60 s for sync; 2 s here)."""
    with HostileRegistry() as registry:
        registry.bodies["1"] = (503, 10)
        registry.retry_after["1"] = "21600"
        error = _manifest(registry)
    assert "503" in str(error)
    assert sum(path.endswith("/manifests/1") for path in registry.requests) == 4  # 3 retries
