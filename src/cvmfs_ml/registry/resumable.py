"""Resumable uploads for content IDs (``/api/v1/uploads``), for bodies too large to send in
one request over a flaky link: create a session bound to a CID, send pieces with
``Content-Range`` (a piece that does not start where the session ends answers 416 with the
current offset), ask for the offset after a break, then publish the session as the CID.

Sessions are the OCI store's upload sessions (a file per session, hashed as it grows), so
they survive a restart of the service; the CID a session is for is kept beside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cvmfs_ml.registry.auth import authenticate, require
from cvmfs_ml.registry.bodies import body_chunks
from cvmfs_ml.registry.cid import ContentId
from cvmfs_ml.registry.oci_store import OciError, OciStore
from cvmfs_ml.registry.service import RegistryService
from cvmfs_ml.registry.tarballs import RejectedError, check_strip

__all__ = ["add_resumable_routes"]


class _FinishedSession:
    """A completed session presented to :meth:`RegistryService.accept` like an upload."""

    def __init__(self, path: Path, sha256: str) -> None:
        self.path = path
        self.size = path.stat().st_size
        self._sha256 = sha256

    def finish(self) -> str:
        with open(self.path, "rb") as handle:
            os.fsync(handle.fileno())
        return self._sha256

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def add_resumable_routes(app: FastAPI, service: RegistryService, store: OciStore) -> None:
    def session_cid(upload_id: str) -> ContentId:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise RejectedError(404, f"no upload {upload_id}")
        try:
            return ContentId.parse((store.uploads / f"{upload_id}.cid").read_text())
        except FileNotFoundError:
            raise RejectedError(404, f"no upload {upload_id}") from None

    def owner(request: Request, cid: ContentId) -> str:
        principal = authenticate(service.config, request.headers.get("authorization"))
        require(service.config, principal, "publish", cid.group)
        return principal.name

    def offset(upload_id: str) -> int:
        try:
            return store.upload_size(upload_id)
        except OciError as exc:
            raise RejectedError(404, exc.message) from exc

    def answer(upload_id: str, status: int = 202) -> Response:
        size = offset(upload_id)
        location = f"/api/v1/uploads/{upload_id}"
        return JSONResponse({"id": upload_id, "location": location, "offset": size}, status,
                            headers={"Location": location, "Upload-Offset": str(size)})  # fmt: skip

    @app.post("/api/v1/uploads")
    def create(request: Request, cid: str) -> Response:
        parsed = ContentId.parse(cid)
        who = owner(request, parsed)
        service.check_rate(who)
        upload_id = service.open_session(store, who)
        (store.uploads / f"{upload_id}.cid").write_text(parsed.text)
        return answer(upload_id, 201)

    @app.get("/api/v1/uploads/{upload_id}")
    def status(request: Request, upload_id: str) -> Response:
        owner(request, session_cid(upload_id))
        return answer(upload_id, 200)

    @app.patch("/api/v1/uploads/{upload_id}")
    async def append(request: Request, upload_id: str) -> Response:
        who = owner(request, session_cid(upload_id))
        current = offset(upload_id)
        content_range = request.headers.get("content-range", "")
        # At most 20 digits (no byte offset has more): int() refuses over 4300, a 500.
        match = re.fullmatch(r"(?:bytes )?(\d{1,20})-(\d{1,20})(?:/\d{1,20}|/\*)?",
                             content_range.strip())  # fmt: skip
        if match is None or int(match.group(1)) != current:
            return JSONResponse(
                {"error": f"the next piece starts at byte {current} (send Content-Range)",
                 "offset": current}, 416, headers={"Upload-Offset": str(current)},
            )  # fmt: skip
        try:
            declared = request.headers.get("content-length")
            with service.receiving(), service.appending(store, upload_id, declared, who) as write:
                async for chunk in body_chunks(request, service.config):
                    write(chunk)
        except OciError as exc:  # 413, or 416: another request is writing the session
            kind = "oversized" if exc.status == 413 else "upload"
            raise RejectedError(exc.status, exc.message, kind) from exc
        return answer(upload_id)

    @app.delete("/api/v1/uploads/{upload_id}")
    def cancel(request: Request, upload_id: str) -> Response:
        owner(request, session_cid(upload_id))
        store.cancel_upload(upload_id)
        return Response(status_code=204)

    @app.put("/api/v1/uploads/{upload_id}")
    async def publish(request: Request, upload_id: str, striplevels: int = 0) -> Response:
        cid = session_cid(upload_id)
        who = owner(request, cid)
        check_strip(striplevels)  # before the session is given up to the spool
        spooled = service.spool / f"{upload_id}.upload"
        try:
            with store.claimed(upload_id):  # not while a piece is still being written
                # A full queue (507) keeps the session: it is published once the queue drains.
                service.check_queue_room(store.upload_size(upload_id))
                path, sha256 = store.session_sha256(upload_id)
                service.spool.mkdir(parents=True, exist_ok=True)  # made again if removed
                os.replace(path, spooled)
        except OciError as exc:
            raise RejectedError(exc.status, exc.message, "upload") from exc
        store.cancel_upload(upload_id)
        accepted = await run_in_threadpool(
            service.accept, cid, _FinishedSession(spooled, sha256), striplevels, who
        )
        if accepted.present:
            return JSONResponse(service.status(cid), 200)
        assert accepted.job is not None
        data: dict[str, Any] = accepted.job.to_json()
        return JSONResponse(data, 202)
