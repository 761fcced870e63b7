"""The OCI distribution endpoints (``/v2/``) and the registry token flow (``/token``).

Pull, push (monolithic and chunked uploads, cross-repository mount), manifests by tag and
digest, tags list, referrers and delete, with errors in the spec's JSON form. A tagged
model artifact (ORAS, ModelPack, KitOps) pushed to ``<namespace>/<name>:<version>`` is then
published through the models layer as that model version, one at a time, in the first
repository; its state is at ``/api/v1/oci/<namespace>/<name>/<version>``. A pushed container
image is published as ``cvmfs-ml sync`` publishes it, in DUCC's layout (``/.flat/<config>/``
and the link ``/<registry>/<repository>:<tag>``, :mod:`cvmfs_ml.registry.image_push`), unless
``unpack_images`` is off.

``/token`` answers the ``WWW-Authenticate: Bearer realm=...`` challenge: given a registry
token as the Basic password (``oras login``, ``skopeo --creds NAME:TOKEN``) or as a bearer
token, it hands the same token back, so the client sends it as ``Bearer`` from then on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import re
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import classify, ingest_oci
from cvmfs_ml.models.sources.oci_client import OCI_INDEX, OciReference
from cvmfs_ml.registry.auth import ANONYMOUS_TOKEN, authenticate, require, token_from_header
from cvmfs_ml.registry.bodies import body_chunks
from cvmfs_ml.registry.image_push import image_registry_name, publish_pushed_image
from cvmfs_ml.registry.local_client import LocalRegistryClient
from cvmfs_ml.registry.oci_store import (
    DIGEST_RE,
    MAX_MANIFEST_BYTES,
    TAG_RE,
    OciError,
    OciStore,
    check_digest,
    check_name,
)
from cvmfs_ml.registry.preingest import Preingest
from cvmfs_ml.registry.service import RegistryService
from cvmfs_ml.registry.tarballs import RejectedError

__all__ = ["add_oci_routes", "oci_error"]

log = logging.getLogger("cvmfs_ml.registry")
SERVICE_NAME = "cvmfs-ml-registry"
_API_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
_MODEL_KINDS = ("artifact", "modelpack", "kitops")
MAX_TAGS_PAGE = 1000
"""Tags (or referrers) one listing answers at most, with a ``Link`` to the rest
(distribution's default for tags)."""
RECEIVE_BLOCK = 4 * 2**20
"""Bytes of a blob upload gathered before they are written, hashed and pre-ingested."""


def oci_error(status: int, code: str, message: str, detail: Any = None,
              headers: dict[str, str] | None = None) -> Response:  # fmt: skip
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return JSONResponse(body, status, headers={**_API_HEADER, **(headers or {})})


def challenge(request: Request, name: str | None, action: str) -> dict[str, str]:
    realm = f"{request.base_url}token"
    scope = f',scope="repository:{name}:{action}"' if name else ""
    return {"WWW-Authenticate": f'Bearer realm="{realm}",service="{SERVICE_NAME}"{scope}'}


class ModelPublisher:
    """Publishes pushed model artifacts through the models layer, one at a time.

    Each tag pushed is one publish, queued here (memory only) and recorded in the store's
    ``publishes``. Stopping waits for the publish under way, not for those still queued: they
    are cancelled and recorded as failed (pushing the tag again queues it again), so a long
    queue cannot hold a SIGTERM. Nothing resumes a publish after a restart, so those a past
    run left queued or publishing (killed) are recorded as failed when the next one starts.
    """

    STOPPED = "the registry stopped before publishing it: push the tag again"
    INTERRUPTED = "the registry stopped while publishing it: push the tag again"
    UNEXPECTED = "an unexpected error in the registry (its log has the details): report it"

    def __init__(self, service: RegistryService, store: OciStore) -> None:
        self.service = service
        self.store = store
        first = service.workers[service.repositories[0]].publisher
        self.preingest = Preingest(first, lambda: service.config.preingest)
        self._lock = threading.Lock()
        self._queued: dict[Future[None], tuple[str, str, str, str | None]] = {}
        forgotten = store.fail_unfinished(self.INTERRUPTED)
        if forgotten:
            log.info("%d pushed tag(s) were not published before the last stop", forgotten)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="registry-oci-publish")
        # The models layer's publishing code loads now, not in the first push's time.
        self._pool.submit(importlib.import_module, "cvmfs_ml.models.publish")

    def close(self) -> None:
        self.preingest.close()
        with self._lock:
            queued = list(self._queued.items())
        cancelled = 0
        for future, (repo, tag, digest, model) in queued:
            if future.cancel():  # not started: false for the one under way, which finishes
                self.store.set_publish(repo, tag, digest, "failed", reason=self.STOPPED,
                                       model=model)  # fmt: skip
                cancelled += 1
        if cancelled:
            log.info("stopping: %d queued publish(es) of pushed tags cancelled", cancelled)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _queue(self, repo: str, tag: str, digest: str, model: str | None,
               task: Callable[..., None], *args: Any) -> None:  # fmt: skip
        self.store.set_publish(repo, tag, digest, "queued", model=model)

        def run() -> None:
            try:
                task(*args)
            except Exception:  # a bug: in the log with its traceback, and the push is failed,
                # not left "publishing" for ever (an executor keeps a task's exception to itself)
                log.exception("publishing %s:%s failed unexpectedly", repo, tag)
                self.service.metrics.errors.labels("oci_publish").inc()
                self.store.set_publish(repo, tag, digest, "failed", reason=self.UNEXPECTED,
                                       model=model)  # fmt: skip

        try:
            future = self._pool.submit(run)
        except RuntimeError:  # shut down: the registry is stopping
            self.store.set_publish(repo, tag, digest, "failed", reason=self.STOPPED, model=model)
            return
        with self._lock:
            self._queued[future] = (repo, tag, digest, model)
        future.add_done_callback(self._forget)  # at once if it finished already

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._queued.pop(future, None)

    def submit(self, repo: str, tag: str, digest: str, document: dict[str, Any], who: str,
               host: str = "") -> None:  # fmt: skip
        kind = "index" if "manifests" in document else classify(document)
        parts = repo.split("/")
        reason = None
        if kind == "index":
            reason = "an index: push the model manifest itself"
        elif kind == "image" and not self.service.config.unpack_images:
            reason = "a container image, and unpack_images is off"
        elif kind not in (*_MODEL_KINDS, "image"):
            reason = f"a {kind}, not a model artifact or an image"
        elif len(parts) != 2 and kind != "image":
            reason = "model repositories are <namespace>/<name>"
        elif kind != "image" and not document.get("layers"):  # a signature, an attestation
            reason = "the manifest has no layers: no files to publish as a model"
        if reason is None and kind == "image":  # DUCC's layout, by sync's unpacker
            registry = image_registry_name(self.service.config.image_registry, host)
            self._queue(repo, tag, digest, None, publish_pushed_image, self.service, self.store,
                        repo, tag, digest, registry)  # fmt: skip
            return
        if reason is None:
            try:
                ref = ModelRef(parts[0], parts[1], tag)
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            self.store.set_publish(repo, tag, digest, "skipped", reason=reason)
            return
        self._queue(repo, tag, digest, str(ref), self._publish, repo, tag, digest, ref, who)

    def _publish(self, repo: str, tag: str, digest: str, ref: ModelRef, who: str) -> None:
        self.store.set_publish(repo, tag, digest, "publishing", model=str(ref))
        worker = self.service.workers[self.service.repositories[0]]
        try:
            result = ingest_oci(
                worker.publisher, OciReference("localhost", repo, tag, digest), ref,
                client=LocalRegistryClient(self.store),  # type: ignore[arg-type]
                publisher_name=who, before_publish=self.preingest.prime,
                max_catalogs=self.service.config.max_tar_catalogs,
            )  # fmt: skip
        except (CvmfsMlError, ValueError, OSError, sqlite3.OperationalError) as exc:
            reason = worker.failure_reason(exc)
            log.warning("publishing %s:%s as %s failed: %s", repo, tag, ref, reason)
            self.service.metrics.errors.labels("oci_publish").inc()
            self.store.set_publish(repo, tag, digest, "failed", reason=reason, model=str(ref))
            return
        revision = worker.publisher.manifest().revision
        if result.skipped:  # the same push again: that version records this manifest already
            log.info("%s:%s is model %s already; nothing published", repo, tag, ref)
        else:
            self.service.metrics.publishes.labels(worker.fqrn).inc()
            log.info("published %s:%s as model %s in revision %d (%s)", repo, tag, ref, revision,
                     ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()))  # fmt: skip
        self.store.set_publish(repo, tag, digest, "published", model=str(result.ref),
                               revision=revision)  # fmt: skip


def add_oci_routes(app: FastAPI, service: RegistryService, store: OciStore) -> ModelPublisher:
    models = ModelPublisher(service, store)
    preingest = models.preingest

    def allowed(request: Request, name: str | None, action: str) -> str:
        principal = authenticate(service.config, request.headers.get("authorization"))
        require(service.config, principal, action, name.split("/", 1)[0] if name else None)
        return principal.name

    def upload_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
        return {
            **_API_HEADER,
            "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
            "Range": f"0-{max(size - 1, 0)}",
            "Docker-Upload-UUID": upload_id,
            "OCI-Chunk-Min-Length": "0",
        }

    async def receive(request: Request, upload_id: str, who: str) -> int:
        limit = service.config.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise OciError(413, "SIZE_INVALID", f"blob larger than {limit} bytes")
        size = 0
        writing = False  # refused at the start (another request is writing it): its feed stays
        # An empty body (docker's closing PUT) holds no buffer: it needs no place.
        place = service.receiving() if declared != "0" else contextlib.nullcontext()
        with place:
            try:
                with service.appending(store, upload_id, declared, who) as write:
                    writing = True
                    size = store.upload_size(upload_id)
                    # The server hands the body over in socket-read pieces (tens of KiB); py-spy
                    # found the event loop in their writes and hashes for most of a 1 GiB push,
                    # with the pre-ingest threads busy beside it. Blocks of RECEIVE_BLOCK bytes
                    # make that a few hundred calls instead of tens of thousands.
                    block = bytearray()
                    try:
                        async for chunk in body_chunks(request, service.config):
                            block += chunk
                            if len(block) >= RECEIVE_BLOCK:
                                full, block = block, bytearray()
                                offset, size = size, write(full)
                                await preingest.feed(upload_id, offset, full)
                    except BaseException:
                        if block:  # what arrived is kept, as it was piece by piece (resumable)
                            write(block)
                        raise
                    if block:
                        offset, size = size, write(block)
                        await preingest.feed(upload_id, offset, block)
            except BaseException:
                if writing:
                    preingest.abort(upload_id)
                raise
        return size

    async def finish(name: str, upload_id: str, digest: str, size: int) -> None:
        try:
            await run_in_threadpool(store.finish_upload, upload_id, digest, name)
        except BaseException:
            preingest.abort(upload_id)
            raise
        preingest.finish(upload_id, digest, size)

    def blob_created(name: str, digest: str) -> Response:
        headers = {**_API_HEADER, "Location": f"/v2/{name}/blobs/{digest}",
                   "Docker-Content-Digest": digest}  # fmt: skip
        return Response(status_code=201, headers=headers)

    @app.get("/v2/")
    def base(request: Request) -> Response:
        """Without credentials: the challenge, always. Clients (skopeo, docker) probe here to
        learn whether to authenticate; a 200 would make them push without their token."""
        header = request.headers.get("authorization")
        if header is None:
            raise RejectedError(401, "authenticate at the token realm", "auth")
        principal = authenticate(service.config, header)
        if principal.anonymous and not service.config.anonymous_read:
            raise RejectedError(401, "a token is required", "auth")
        return JSONResponse({}, headers=_API_HEADER)

    @app.get("/token")
    def token(request: Request) -> Response:
        header = request.headers.get("authorization")
        principal = authenticate(service.config, header)
        if principal.anonymous:
            if not service.config.anonymous_read:
                raise RejectedError(401, "send the registry token as the password", "auth")
            value = ANONYMOUS_TOKEN  # pulls only: writes still need a real token
        else:
            assert header is not None
            value = token_from_header(header)
        return JSONResponse({"token": value, "access_token": value, "expires_in": 3600})

    # -- uploads (before the blob routes: the more specific paths first) ----------------------
    @app.post("/v2/{name:path}/blobs/uploads/")
    async def start_upload(request: Request, name: str, digest: str | None = None,
                           mount: str | None = None) -> Response:  # fmt: skip
        check_name(name)
        who = allowed(request, name, "publish")
        service.check_rate(who)
        if digest is not None:  # a monolithic push: refused before its body, not after
            check_digest(digest)
        source = request.query_params.get("from")
        if mount is not None and source is not None:  # without "from": a plain upload (202)
            check_digest(mount)
            allowed(request, check_name(source), "read")
            if store.holds(source, mount):
                store.link(name, mount)  # blobs are stored once: mounting is a row
                return blob_created(name, mount)
        upload_id = await run_in_threadpool(service.open_session, store, who)
        store.bind_upload(upload_id, name)
        if digest is None:
            return Response(status_code=202, headers=upload_headers(name, upload_id, 0))
        try:
            size = await receive(request, upload_id, who)
            await finish(name, upload_id, digest, size)
        except BaseException:
            store.cancel_upload(upload_id)
            raise
        return blob_created(name, digest)

    @app.patch("/v2/{name:path}/blobs/uploads/{upload_id}")
    async def patch_upload(request: Request, name: str, upload_id: str) -> Response:
        check_name(name)
        who = allowed(request, name, "publish")
        current = store.upload_of(name, upload_id)
        content_range = request.headers.get("content-range")
        if content_range:
            # At most 20 digits (no byte offset has more): int() refuses over 4300, a 500.
            match = re.fullmatch(r"(?:bytes )?(\d{1,20})-(\d{1,20})", content_range.strip())
            if match is None or int(match.group(1)) != current:
                return Response(status_code=416, headers=upload_headers(name, upload_id, current))
        size = await receive(request, upload_id, who)
        return Response(status_code=202, headers=upload_headers(name, upload_id, size))

    @app.put("/v2/{name:path}/blobs/uploads/{upload_id}")
    async def put_upload(request: Request, name: str, upload_id: str,
                         digest: str | None = None) -> Response:  # fmt: skip
        check_name(name)
        who = allowed(request, name, "publish")
        if digest is None:
            raise OciError(400, "DIGEST_INVALID", "the closing PUT needs ?digest=")
        check_digest(digest)
        store.upload_of(name, upload_id)  # 404 unless it is this repository's session
        size = await receive(request, upload_id, who)
        await finish(name, upload_id, digest, size)
        return blob_created(name, digest)

    @app.get("/v2/{name:path}/blobs/uploads/{upload_id}")
    def upload_status(request: Request, name: str, upload_id: str) -> Response:
        check_name(name)
        allowed(request, name, "publish")
        size = store.upload_of(name, upload_id)
        return Response(status_code=204, headers=upload_headers(name, upload_id, size))

    @app.delete("/v2/{name:path}/blobs/uploads/{upload_id}")
    def cancel_upload(request: Request, name: str, upload_id: str) -> Response:
        check_name(name)
        allowed(request, name, "publish")
        store.upload_of(name, upload_id)  # 404 if unknown here
        preingest.abort(upload_id)
        store.cancel_upload(upload_id)
        return Response(status_code=204, headers=_API_HEADER)

    # -- blobs --------------------------------------------------------------------------------
    @app.api_route("/v2/{name:path}/blobs/{digest}", methods=["GET", "HEAD"])
    def get_blob(request: Request, name: str, digest: str) -> Response:
        check_name(name)
        allowed(request, name, "read")
        path = store.blob_path(digest)
        if not store.holds(name, digest):
            raise OciError(404, "BLOB_UNKNOWN", f"blob {digest} unknown", {"digest": digest})
        headers = {**_API_HEADER, "Docker-Content-Digest": digest}
        if request.method == "HEAD":
            headers["Content-Length"] = str(path.stat().st_size)
            return Response(status_code=200, headers=headers,
                            media_type="application/octet-stream")  # fmt: skip
        return FileResponse(path, headers=headers, media_type="application/octet-stream")

    @app.delete("/v2/{name:path}/blobs/{digest}")
    def delete_blob(request: Request, name: str, digest: str) -> Response:
        check_name(name)
        allowed(request, name, "admin")
        store.delete_blob(name, digest)
        return Response(status_code=202, headers=_API_HEADER)

    # -- manifests ----------------------------------------------------------------------------
    @app.api_route("/v2/{name:path}/manifests/{reference}", methods=["GET", "HEAD"])
    def get_manifest(request: Request, name: str, reference: str) -> Response:
        check_name(name)
        allowed(request, name, "read")
        found = store.resolve(name, reference)
        body = found.read()
        headers = {**_API_HEADER, "Docker-Content-Digest": found.digest,
                   "Content-Length": str(len(body))}  # fmt: skip
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers, media_type=found.media_type)
        return Response(body, headers=headers, media_type=found.media_type)

    @app.put("/v2/{name:path}/manifests/{reference}")
    async def put_manifest(request: Request, name: str, reference: str) -> Response:
        check_name(name)
        who = allowed(request, name, "publish")
        tags = list(request.query_params.getlist("tag"))
        if not DIGEST_RE.fullmatch(reference):
            if not TAG_RE.fullmatch(reference):
                raise OciError(400, "TAG_INVALID", f"invalid tag {reference!r}")
            tags.append(reference)
        tags = list(dict.fromkeys(tags))  # each tag is one publish: once each
        limit = service.config.max_tags_per_push
        if len(tags) > limit:  # each is a model version queued on the one publishing thread
            message = f"{len(tags)} tags in one push; at most {limit} (max_tags_per_push)"
            detail = {"limit": limit, "key": "max_tags_per_push"}
            raise OciError(400, "TAG_INVALID", message, detail)
        for tag in tags:
            if not TAG_RE.fullmatch(tag):
                raise OciError(400, "TAG_INVALID", f"invalid tag {tag!r}")
        body = bytearray()
        # Gathered in memory (up to MAX_MANIFEST_BYTES): one of max_receiving_uploads places,
        # as blob bodies; before, any number were received at once.
        with service.receiving():
            async for chunk in body_chunks(request, service.config):
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise OciError(413, "SIZE_INVALID",
                                   f"manifest over {MAX_MANIFEST_BYTES} bytes")  # fmt: skip
        media_type = request.headers.get("content-type", "").split(";")[0].strip()
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if DIGEST_RE.fullmatch(reference) and reference != actual:
            raise OciError(400, "DIGEST_INVALID", f"manifest has digest {actual}, not {reference}")
        digest = await run_in_threadpool(store.put_manifest, name, bytes(body), media_type, tags)
        document = jsontext.loads(bytes(body))
        headers = {**_API_HEADER, "Location": f"/v2/{name}/manifests/{digest}",
                   "Docker-Content-Digest": digest}  # fmt: skip
        subject = document.get("subject")  # the store checked it: a descriptor, or absent
        if isinstance(subject, dict) and isinstance(subject.get("digest"), str):
            headers["OCI-Subject"] = subject["digest"]
        for tag in tags:
            models.submit(name, tag, digest, document, who, request.headers.get("host", ""))
        return Response(status_code=201, headers=headers)

    @app.delete("/v2/{name:path}/manifests/{reference}")
    def delete_manifest(request: Request, name: str, reference: str) -> Response:
        check_name(name)
        allowed(request, name, "admin")
        store.delete_manifest(name, reference)
        return Response(status_code=202, headers=_API_HEADER)

    @app.get("/v2/{name:path}/tags/list")
    def tags_list(request: Request, name: str, n: int | None = None,
                  last: str | None = None) -> Response:  # fmt: skip
        check_name(name)
        allowed(request, name, "read")
        # A page at most, read as such: the whole list, read whole, grew with every push.
        page = MAX_TAGS_PAGE if n is None else max(0, min(n, MAX_TAGS_PAGE))
        tags = store.tags(name, last, page + 1)
        headers = dict(_API_HEADER)
        if len(tags) > page:
            tags = tags[:page]
            if tags:
                headers["Link"] = f'</v2/{name}/tags/list?n={page}&last={tags[-1]}>; rel="next"'
        return JSONResponse({"name": name, "tags": tags}, headers=headers)

    @app.get("/v2/{name:path}/referrers/{digest}")
    def referrers(request: Request, name: str, digest: str, artifactType: str | None = None,
                  last: str | None = None) -> Response:  # fmt: skip
        check_name(name)
        allowed(request, name, "read")
        check_digest(digest)
        # A page at most, read as such (as the tags list), and a Link to the next.
        found = store.referrers(name, digest, artifactType, last, MAX_TAGS_PAGE + 1)
        headers = dict(_API_HEADER)
        if len(found) > MAX_TAGS_PAGE:
            found = found[:MAX_TAGS_PAGE]
            query = urlencode({"last": found[-1]["digest"],
                               **({"artifactType": artifactType} if artifactType else {})})
            headers["Link"] = f'</v2/{name}/referrers/{digest}?{query}>; rel="next"'
        if artifactType is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return JSONResponse(index, headers=headers, media_type=OCI_INDEX)

    @app.get("/api/v1/oci/{name:path}/{tag}")
    def publish_state(request: Request, name: str, tag: str) -> dict[str, Any]:
        allowed(request, name, "read")
        state = store.publish_state(name, tag)
        if state is None:
            raise RejectedError(404, f"nothing pushed as {name}:{tag}")
        return state

    @app.exception_handler(OciError)
    async def oci_failed(request: Request, exc: OciError) -> Response:
        if exc.status != 404 or request.method not in ("GET", "HEAD"):  # else an answer: every
            service.metrics.errors.labels("oci").inc()  # push HEADs its blobs before sending
        return oci_error(exc.status, exc.code, exc.message, exc.detail)

    return models
