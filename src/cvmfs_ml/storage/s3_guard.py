"""What an S3 endpoint answers is checked before it is believed: bodies read into memory are
bounded, a broken stream is a :class:`StorageError`, redirects are not followed, and a listing
that goes round in circles stops.

The endpoint is the one configured (``CVMFS_S3_HOST``); a proxy in front of it, a misconfigured
gateway or a hostile server can answer anything, and the publisher must fail with one line
rather than fill its memory, loop forever or print a traceback.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterable, Iterator
from typing import Any

from cvmfs_ml.cvmfs.manifest import MAX_MANIFEST_BYTES
from cvmfs_ml.cvmfs.whitelist import MAX_WHITELIST_BYTES
from cvmfs_ml.errors import FormatError, StorageError

__all__ = ["STREAM_ERRORS", "checked_pages", "read_body", "refuse_redirects", "whole_read_limit"]

MAX_EMPTY_PAGES = 100  # truncated listing pages in a row with no key: S3 never sends one
_READ_LIMITS = {".cvmfspublished": MAX_MANIFEST_BYTES, ".cvmfswhitelist": MAX_WHITELIST_BYTES}
_WHOLE_READ_LIMIT = 256 * 2**20  # any other file read whole into memory (reflog, gc status)


def _stream_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (BotoCoreError, HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)


STREAM_ERRORS = _stream_errors()
"""What a response body's read raises when the connection breaks, stalls or ends early
(botocore's ResponseStreamingError, urllib3's ReadTimeoutError, ...): none is ours."""


def whole_read_limit(rel_path: str) -> int:
    """The most bytes :meth:`S3Store.get_bytes` accepts for ``rel_path``."""
    return _READ_LIMITS.get(rel_path.lstrip("/"), _WHOLE_READ_LIMIT)


def read_body(answer: dict[str, Any], limit: int, rel_path: str, location: str) -> bytes:
    """A ``get_object`` answer's body, at most ``limit`` bytes: a larger declared length is
    refused before anything is read, and an undeclared one stops one byte past ``limit``."""
    body = answer["Body"]
    try:
        declared = int(answer.get("ContentLength") or 0)
        if declared > limit:
            raise FormatError(rel_path, f"{location} declares {declared} bytes, over {limit}")
        data = body.read(limit + 1)
    except STREAM_ERRORS as exc:
        raise StorageError(f"S3 read of {rel_path} from {location} broke off: {exc}") from exc
    finally:
        body.close()
    if len(data) > limit:
        raise FormatError(rel_path, f"{location} sent more than {limit} bytes")
    if declared and len(data) != declared:  # botocore checks the length only of unsized reads
        raise StorageError(
            f"S3 read of {rel_path} from {location} broke off after {len(data)} of {declared} bytes"
        )
    return bytes(data)


def refuse_redirects(client: Any) -> None:
    """Make botocore's S3 region redirector stand down for ``client``.

    On a 301/302/307 it asks the same endpoint for the bucket's region, and when that answer is
    a redirect too it asks again, recursing until Python's limit (RecursionError, about 300
    requests later). The endpoint is configured, as upstream's uploader has it: a redirect
    is reported (with its Location) instead of followed. The redirector skips any request whose
    context says it was redirected already, so each request is marked so before it is sent.
    """

    def mark(context: dict[str, Any], **_: Any) -> None:
        redirect = context.get("s3_redirect")
        if isinstance(redirect, dict):
            redirect["redirected"] = True

    client.meta.events.register("before-call.s3", mark)


def checked_pages(pages: Iterable[dict[str, Any]], location: str) -> Iterator[dict[str, Any]]:
    """``list_objects_v2`` pages, stopped with a :class:`StorageError` when the listing does not
    advance: a continuation token seen before (botocore only notices one repeated at once, so a
    server alternating two tokens listed forever), keys not in ascending order as S3 lists
    them, or many truncated pages in a row without a key."""
    seen: set[str] = set()
    last_key, empty = "", 0
    for page in pages:
        keys = [str(item.get("Key", "")) for item in page.get("Contents", [])]
        if keys and last_key and keys[0] <= last_key:
            raise StorageError(f"S3 listing of {location} went back to {keys[0]!r}; stopped")
        last_key = keys[-1] if keys else last_key
        empty = 0 if keys else empty + 1
        token = page.get("NextContinuationToken")
        if token is not None and (token in seen or empty > MAX_EMPTY_PAGES):
            raise StorageError(
                f"S3 listing of {location} does not advance (continuation token {token[:40]!r}"
                f" after {len(seen)} pages); stopped"
            )
        if token is not None:
            seen.add(token)
        yield page
