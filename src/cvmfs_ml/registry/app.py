"""The HTTP face of the registry (FastAPI): user-pub's ``/pubapi/``, the JSON ``/api/v1/``,
``/metrics`` and ``/healthz``; the OCI endpoints (:mod:`.oci_api`), resumable uploads
(:mod:`.resumable`) and the web page (:mod:`.web`) are added from their modules.

``/pubapi/`` answers exactly as cvmfs-user-pub does (``text/plain``, ``Cache-control:
max-age=0``; ``OK``, ``PRESENT:<path>``, ``MISSING``, ``repos:<a>,<b>``; ``400 Bad request:
<reason>``), so its clients (jobsub_lite, justin-cvmfs-upload, curl scripts) work unchanged.
Bodies are streamed to the spool folder chunk by chunk, bounded by ``max_upload_bytes``.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cvmfs_ml.errors import is_disk_full
from cvmfs_ml.registry.auth import authenticate, require, require_reader
from cvmfs_ml.registry.bodies import body_chunks
from cvmfs_ml.registry.cid import ContentId, InvalidCidError
from cvmfs_ml.registry.config import Principal
from cvmfs_ml.registry.oci_api import add_oci_routes, challenge, oci_error
from cvmfs_ml.registry.oci_store import OciStore
from cvmfs_ml.registry.resumable import add_resumable_routes
from cvmfs_ml.registry.service import Accepted, RegistryService
from cvmfs_ml.registry.tarballs import RejectedError, check_strip
from cvmfs_ml.registry.web import add_api_docs, add_web_routes

__all__ = ["create_app"]

log = logging.getLogger("cvmfs_ml.registry")
_NO_CACHE = {"Cache-control": "max-age=0"}


def _text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(body + "\n", status, headers={**_NO_CACHE, **(headers or {})})


def _oci_name(path: str) -> str | None:
    """``ns/name`` of a ``/v2/ns/name/<blobs|manifests|tags|referrers>/...`` path."""
    match = re.match(r"/v2/(.+?)/(?:blobs|manifests|tags|referrers)/", path)
    return match.group(1) if match else None


async def _receive(request: Request, service: RegistryService) -> Any:
    """Stream the body into a new upload file; 413 as soon as it passes the limit.

    It takes one of the ``max_receiving_uploads`` places (429 past them) as OCI and resumable
    bodies do: before, any number of user-pub bodies were received at once, each holding a
    request, an open spool file and the disk it filled for as long as its client sent.
    """
    limit = service.config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RejectedError(400, "bad Content-Length")
        if int(declared) > limit:
            raise RejectedError(413, f"body larger than {limit} bytes", "oversized")
        await run_in_threadpool(service.check_queue_room, int(declared))  # before writing it
    with service.receiving():
        return await _spool(request, service)


async def _spool(request: Request, service: RegistryService) -> Any:
    upload = await run_in_threadpool(service.new_upload)
    try:
        async for chunk in body_chunks(request, service.config):
            upload.write(chunk)
    except ClientDisconnect:
        upload.discard()
        raise RejectedError(400, "the client went away before the body was complete") from None
    except BaseException:
        upload.discard()
        raise
    return upload


def create_app(service: RegistryService, *, manage_service: bool = True) -> FastAPI:
    """The ASGI application; ``manage_service`` starts and stops the workers with it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_service:
            service.start()
        try:
            yield
        finally:
            await run_in_threadpool(models.close)
            oci_store.close()
            if manage_service:
                await run_in_threadpool(service.stop)

    app = FastAPI(title="cvmfs-ml registry", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    def who(request: Request) -> Principal:
        return authenticate(service.config, request.headers.get("authorization"))

    def allowed(request: Request, action: str, namespace: str | None) -> Principal:
        principal = who(request)
        require(service.config, principal, action, namespace)
        return principal

    @app.exception_handler(RejectedError)
    async def rejected(request: Request, exc: RejectedError) -> Response:
        path = request.url.path
        oci = path.startswith(("/v2", "/token"))
        # The challenge is a step of the token flow (clients ask without credentials first),
        # not an error: counted, every push went up by one.
        if not (oci and exc.status == 401 and "authorization" not in request.headers):
            service.metrics.errors.labels(exc.kind).inc()
        headers = {"Retry-After": str(exc.retry_after)} if exc.status == 429 else {}
        if oci:
            name = _oci_name(path)
            action = "pull" if request.method in ("GET", "HEAD") else "pull,push"
            code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN",
                    408: "BLOB_UPLOAD_INVALID", 413: "SIZE_INVALID", 429: "TOOMANYREQUESTS",
                    507: "DENIED"}.get(exc.status, "UNSUPPORTED")  # fmt: skip
            if exc.status == 401:
                headers = challenge(request, name, action)
            return oci_error(exc.status, code, exc.reason, headers=headers)
        if exc.status == 401:
            headers = challenge(request, None, "")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.reason}, exc.status, headers=headers)
        if exc.status in (401, 403):
            return _text(f"Access denied: {exc.reason}", exc.status, headers)
        if exc.status == 413:
            return _text(f"Request too large: {exc.reason}", 413)
        if exc.status == 429:
            return _text(f"Too many requests: {exc.reason}", 429, headers)
        if exc.status >= 500:
            return _text(f"Server error: {exc.reason}", exc.status)
        return _text(f"Bad request: {exc.reason}", exc.status)

    async def disk_full(request: Request, exc: Exception) -> Response:
        """A full spool or data disk: 507 with what to do, not a 500 with a traceback; what
        was received is discarded where it was written (``_receive``, the upload stores)."""
        if not is_disk_full(exc):
            raise exc  # a bug or another fault: the server's 500 and its traceback
        log.error("%s %s: the registry's disk is full: %s", request.method, request.url.path, exc)
        reason = "the registry's disk is full; this upload was not stored, try again later"
        return await rejected(request, RejectedError(507, reason, "disk_full"))

    @app.exception_handler(ClientDisconnect)
    async def went_away(request: Request, exc: ClientDisconnect) -> Response:
        """A client that closed the connection mid-body (an OCI upload keeps what arrived):
        one line, where each one logged a traceback. Nobody reads the answer."""
        log.info("%s %s: the client went away before its body was complete", request.method,
                 request.url.path)  # fmt: skip
        reason = "the client went away before the body was complete"
        return await rejected(request, RejectedError(400, reason, "disconnected"))

    app.add_exception_handler(OSError, disk_full)
    app.add_exception_handler(sqlite3.OperationalError, disk_full)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith("/v2"):  # the spec's error body, not FastAPI's
            return oci_error(400, "UNSUPPORTED", "invalid request parameters",
                             jsonable_encoder(exc.errors()))  # fmt: skip
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/v2"):
            return oci_error(exc.status_code, "UNSUPPORTED", str(exc.detail))
        return await http_exception_handler(request, exc)

    @app.exception_handler(InvalidCidError)
    async def bad_cid(request: Request, exc: InvalidCidError) -> Response:
        service.metrics.errors.labels("bad_cid").inc()
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, 400)
        return _text(f"Bad request: {exc}", 400)

    # -- user-pub -----------------------------------------------------------------------------
    @app.get("/pubapi/ping")
    def ping() -> Response:
        return _text("OK")

    @app.get("/pubapi/config")
    def config() -> Response:
        return _text("repos:" + ",".join(service.repositories))

    def _lookup(request: Request, cid: str | None, action: str) -> Response:
        """``exists`` (read) and ``update`` (publish: it restarts the CID's expiry clock)."""
        parsed = ContentId.parse(cid)
        allowed(request, action, parsed.group)
        path = service.exists(parsed) if action == "read" else service.update(parsed)
        return _text(f"PRESENT:{path}" if path else "MISSING")

    @app.get("/pubapi/exists")
    def exists(request: Request, cid: str | None = None) -> Response:
        return _lookup(request, cid, "read")

    @app.get("/pubapi/update")
    def update(request: Request, cid: str | None = None) -> Response:
        return _lookup(request, cid, "publish")

    async def _publish(request: Request, cid: str | None, striplevels: str) -> Accepted:
        parsed = ContentId.parse(cid)
        principal = allowed(request, "publish", parsed.group)
        service.check_rate(principal.name)
        strip = check_strip(striplevels)
        upload = await _receive(request, service)
        return await run_in_threadpool(service.accept, parsed, upload, strip, principal.name)

    @app.post("/pubapi/publish")
    async def publish(request: Request, cid: str | None = None, striplevels: str = "0") -> Response:
        accepted = await _publish(request, cid, striplevels)
        return _text(f"PRESENT:{accepted.present}" if accepted.present else "OK")

    @app.api_route("/pubapi/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"])
    def unknown(rest: str) -> Response:
        return _text("Unrecognized api", 404)

    # -- JSON API -----------------------------------------------------------------------------
    @app.post("/api/v1/cids/{cid:path}", status_code=202)
    async def api_publish(request: Request, cid: str, striplevels: str = "0") -> Response:
        accepted = await _publish(request, cid, striplevels)
        if accepted.present:
            status = service.status(ContentId.parse(cid))
            return JSONResponse(status, 200)
        assert accepted.job is not None
        return JSONResponse(accepted.job.to_json(), 202)

    @app.get("/api/v1/cids/{cid:path}")
    def api_status(request: Request, cid: str) -> dict[str, Any]:
        parsed = ContentId.parse(cid)
        allowed(request, "read", parsed.group)
        return service.status(parsed)

    @app.get("/api/v1/jobs/{job_id}")
    def api_job(request: Request, job_id: str) -> dict[str, Any]:
        job = service.job(job_id)
        if job is None:
            raise RejectedError(404, f"no job {job_id}")
        allowed(request, "read", ContentId.parse(job.cid).group)
        data = job.to_json()
        data["path"] = service.cid_path(job.repo, job.cid) if job.state == "published" else None
        return data

    @app.get("/api/v1/repositories")
    def api_repositories(request: Request) -> list[dict[str, Any]]:
        require_reader(service.config, request.headers.get("authorization"))
        return [{"fqrn": r, "revision": service.revision(r)} for r in service.repositories]

    @app.get("/api/v1/repositories/{fqrn}/revisions/{revision}")
    def api_revision(request: Request, fqrn: str, revision: int) -> dict[str, Any]:
        """Is revision N of FQRN published (at the Stratum 0 this service writes)?"""
        require_reader(service.config, request.headers.get("authorization"))
        if fqrn not in service.repositories:
            raise RejectedError(404, f"no repository {fqrn}")
        current = service.revision(fqrn)
        replica = service.stratum1_revision(fqrn)
        return {
            "stratum1_revision": replica,
            "visible_at_stratum1": None if replica is None else replica >= revision,
            "fqrn": fqrn,
            "revision": revision,
            "current": current,
            "visible": current >= revision,
        }

    @app.post("/api/v1/repositories/{fqrn}/cleanup")
    async def api_cleanup(
        request: Request, fqrn: str, max_days: float | None = None
    ) -> dict[str, Any]:
        allowed(request, "admin", None)
        if fqrn not in service.repositories:
            raise RejectedError(404, f"no repository {fqrn}")
        report = await run_in_threadpool(service.cleanup, fqrn, max_days)
        return {
            "repository": report.repository, "removed": report.removed,
            "revision": report.revision, "objects_removed": report.objects_removed,
            "bytes_removed": report.bytes_removed,
        }  # fmt: skip

    add_web_routes(app, service)
    add_api_docs(app)
    oci_store = OciStore(service.data_dir / "oci")
    models = add_oci_routes(app, service, oci_store)
    add_resumable_routes(app, service, oci_store)

    # -- operations ---------------------------------------------------------------------------
    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    def healthz() -> Response:
        """200 when every repository's worker runs, 503 (``degraded``) otherwise."""
        stats = service.store.queue_stats()
        repositories = {
            r: {"revision": service.revision(r), "queued": stats.get(r, (0, None))[0],
                "cleaning": service.workers[r].cleaning,
                "worker_alive": service.workers[r].alive}
            for r in service.repositories
        }  # fmt: skip
        healthy = all(entry["worker_alive"] for entry in repositories.values())
        body = {"status": "ok" if healthy else "degraded", "repositories": repositories}
        return JSONResponse(body, 200 if healthy else 503)

    return app
