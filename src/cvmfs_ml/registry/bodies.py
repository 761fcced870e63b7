"""Request bodies from clients that may stall: every upload API reads them through
:func:`body_chunks`.

Why: a client that sends its body a byte now and then, or stops sending without closing the
connection, held its request, its spool or upload file and the disk space it had filled for as
long as it liked (the server has no read timeout of its own). The client's rule for servers
applies the other way round: a body slower than ``upload_low_speed_limit`` bytes/s over each
``upload_low_speed_seconds`` (curl's low-speed rule, upstream's ``CVMFS_LOW_SPEED_LIMIT``) is
refused with 408, and what it wrote is discarded as for any failed upload (an OCI upload
session keeps what arrived, to be resumed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.requests import Request

from cvmfs_ml.registry.config import RegistryConfig
from cvmfs_ml.registry.tarballs import RejectedError

__all__ = ["body_chunks"]


async def body_chunks(request: Request, config: RegistryConfig) -> AsyncIterator[bytes]:
    """``request.stream()``, refused (408) once the client sends too slowly or not at all.

    Only the time spent waiting for the client counts: while the registry itself is busy
    (writing, hashing, a pre-ingest that holds back) the client cannot send either, and that
    is not its slowness.
    """
    limit, seconds = config.upload_low_speed_limit, config.upload_low_speed_seconds
    chunks = request.stream().__aiter__()
    if limit <= 0 or seconds <= 0:
        async for chunk in chunks:
            yield chunk
        return
    waited, moved = 0.0, 0
    while True:
        started = time.monotonic()
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout=seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RejectedError(
                408, f"no part of the body arrived for {seconds:g} s; send it again", "slow"
            ) from None
        waited += time.monotonic() - started
        moved += len(chunk)
        if waited >= seconds:
            if moved < limit * waited:
                raise RejectedError(
                    408, f"the body came slower than upload_low_speed_limit={limit} B/s "
                    f"({moved} bytes in {waited:.1f} s); send it again", "slow",
                )  # fmt: skip
            waited, moved = 0.0, 0
        yield chunk
