"""Just enough of the OCI distribution API to pull: references, manifests, verified blobs.

Pull is the only mandatory category of the distribution spec (``GET /v2/<name>/manifests/<ref>``
and ``GET /v2/<name>/blobs/<digest>``), so that is all this client speaks. It answers the two
authentication challenges registries use: ``Bearer`` (fetch a token from the ``realm`` for the
``scope`` the registry names, anonymously or with basic credentials, as Docker Hub, Harbor and
GitLab want) and ``Basic``. Every manifest and blob is checked against its digest before anyone
sees it; a registry is not trusted to serve what it names.

``plain_http`` is for loopback and test registries; everything else should be HTTPS.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import urllib3

from cvmfs_ml.client.http_pools import BoundedRetry, pool_manager
from cvmfs_ml.client.transfer import (
    Cancellation,
    CancelledError,
    RequestStopped,
    SpeedCheck,
    body_readinto,
)
from cvmfs_ml.client.transfer import finish as finish_response
from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import DownloadError, FormatError, IntegrityError, NotFoundError

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Fetched",
    "OciReference",
    "RegistryClient",
    "VerifiedBlob",
    "check_digest",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

MAX_MANIFEST_BYTES = 16 * 2**20  # the spec asks registries to accept at least 4 MiB
MAX_TOKEN_BYTES = 2**20
_HASHES = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256|sha512):([0-9a-f]+)")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOCKER_HUB = "docker.io"


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``, else FormatError."""
    match = _DIGEST_RE.fullmatch(digest)
    if match is None or len(match.group(2)) != _HASHES[match.group(1)]:
        raise FormatError("digest", f"{digest!r} is not a sha256/sha512 digest")
    return digest


def _digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True)
class OciReference:
    """``registry/repository[:tag][@digest]``, as ``docker pull`` and ``oras pull`` take it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> OciReference:
        """Parse ``[oci://]host[:port]/path[:tag][@sha256:...]``.

        A first component without ``.`` or ``:`` (and not ``localhost``) is a Docker Hub path,
        as for ``docker pull`` (``ubuntu`` is ``docker.io/library/ubuntu:latest``).
        """
        rest = text.strip()
        for prefix in ("oci://", "docker://"):
            if rest.startswith(prefix):
                rest = rest[len(prefix) :]
        digest = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            check_digest(digest)
        first, sep, path = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry = first
        else:
            registry, path = _DOCKER_HUB, rest
            if "/" not in path:
                path = f"library/{path}"
        tag = None
        head, _, last = path.rpartition("/")
        if ":" in last:
            last, tag = last.split(":", 1)
            path = f"{head}/{last}" if head else last
            if _TAG_RE.fullmatch(tag) is None:
                raise FormatError("OCI reference", f"{text!r}: invalid tag {tag!r}")
        if not registry or _REPOSITORY_RE.fullmatch(path) is None:
            raise FormatError("OCI reference", f"{text!r}: expected HOST[:PORT]/REPOSITORY[:TAG]")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def endpoint(self) -> str:
        """The host to contact (Docker Hub's API does not live at ``docker.io``)."""
        return "registry-1.docker.io" if self.registry == _DOCKER_HUB else self.registry

    def with_digest(self, digest: str) -> OciReference:
        return OciReference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


@dataclass(frozen=True)
class Fetched:
    """A manifest as served: its bytes, media type and (verified) digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        try:
            value = jsontext.loads(self.data)
        except ValueError as exc:  # jsontext: every failure is a JSONDecodeError
            raise FormatError(f"manifest {self.digest}", f"not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise FormatError(f"manifest {self.digest}", "not a JSON object")
        return value


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> (``bearer``, {realm, service, scope})."""
    scheme, _, params = header.strip().partition(" ")
    values = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', params)}
    return scheme.lower(), values


class VerifiedBlob(io.RawIOBase):
    """A blob's bytes from an HTTP response, hashed and counted as they go by."""

    def __init__(
        self,
        response: urllib3.BaseHTTPResponse,
        digest: str,
        size: int | None,
        url: str,
        speed: SpeedCheck | None = None,
    ) -> None:
        super().__init__()
        self._response = response
        self._speed = speed
        self.digest = digest
        self.size = size
        self.url = url
        algorithm = digest.split(":", 1)[0]
        self._hasher = hashlib.new(algorithm)
        self.received = 0
        encoding = str(response.headers.get("Content-Encoding", "identity")).lower()
        # Straight into the caller's buffer where urllib3 has nothing to decode: a fresh
        # bytes object per read costs a copy and, at multi-MiB reads, new memory each time.
        self._read_into = body_readinto(response) if encoding == "identity" else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            if self._read_into is not None:
                n = self._read_into(view)
            else:
                data = self._response.read(len(view))
                n = len(data)
                view[:n] = data
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
            raise DownloadError(
                f"blob {self.digest}", [(self.url, "direct", f"after {self.received} bytes: {exc}")]
            ) from exc
        self.received += n
        if self.size is not None and self.received > self.size:
            raise IntegrityError(self.url, f"{self.size} bytes", f"more than {self.size} bytes")
        slow = self._speed.after(n) if self._speed is not None else None
        if slow:
            reason = f"after {self.received} bytes: {slow}"
            raise DownloadError(f"blob {self.digest}", [(self.url, "direct", reason)])
        self._hasher.update(view[:n])
        return n

    def finish(self) -> None:
        """Read what is left, then check size and digest (:class:`IntegrityError`)."""
        while self.read(1 << 20):
            pass
        if self.size is not None and self.received != self.size:
            raise IntegrityError(self.url, f"{self.size} bytes", f"{self.received} bytes")
        algorithm = self.digest.split(":", 1)[0]
        actual = f"{algorithm}:{self._hasher.hexdigest()}"
        if actual != self.digest:
            raise IntegrityError(self.url, self.digest, actual)


class RegistryClient:
    """Pull manifests and blobs from one registry host, authenticating on demand.

    ``username``/``password`` are sent only when the registry asks (to its token realm for a
    Bearer challenge, to the registry itself for Basic). Tokens are cached per scope.
    """

    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool = False,
        username: str | None = None,
        password: str | None = None,
        verify_tls: bool = True,
        timeout: float = 60.0,
        retries: int = 3,
        low_speed_limit: int = 1024,
    ) -> None:
        self.registry = registry
        self.timeout = timeout
        self.low_speed_limit = low_speed_limit
        """Bytes per second a blob must average over each ``timeout`` seconds (0: no limit):
        the read timeout alone never ends a registry that sends a byte now and then."""
        self.base_url = f"{'http' if plain_http else 'https'}://{registry}"
        self._credentials = (username, password or "") if username else None
        self._tokens: dict[str, str] = {}
        self._basic = False
        retry = BoundedRetry(
            wait_at_most=timeout,  # a Retry-After of hours: the round's, the service's
            total=retries,
            other=0,  # TLS failures (a plain-HTTP registry, a bad certificate) do not heal
            backoff_factor=0.3,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "HEAD"}),
            raise_on_status=False,
        )
        self._http = pool_manager(
            maxsize=8,  # layers download in parallel: one kept connection each
            retries=retry,
            timeout=urllib3.Timeout(connect=min(timeout, 15.0), read=timeout),
            cert_reqs="CERT_REQUIRED" if verify_tls else "CERT_NONE",
            headers={"User-Agent": "cvmfs-ml"},
        )

    def close(self) -> None:
        self._http.clear()

    def _speed_check(self) -> SpeedCheck:
        return SpeedCheck(self.low_speed_limit, self.timeout, "the low-speed limit")

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- auth -------------------------------------------------------------------------------------
    def _basic_header(self) -> str:
        assert self._credentials is not None
        user, password = self._credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _auth_header(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self._credentials:
            return {"Authorization": self._basic_header()}
        return {}

    def _answer_challenge(self, header: str, scope: str, url: str) -> None:
        scheme, params = _parse_challenge(header)
        if scheme == "basic":
            if self._credentials is None:
                raise DownloadError(url, [(url, "direct", "401: registry wants a username")])
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise DownloadError(url, [(url, "direct", f"401 with challenge {header!r}")])
        realm = params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise DownloadError(url, [(url, "direct", f"token realm {realm!r} is not HTTP")])
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": self._basic_header()} if self._credentials else {}
        token_url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        try:
            response = self._http.request(
                "GET", token_url, headers=headers, preload_content=False
            )
            data = self._read_document(response, MAX_TOKEN_BYTES, token_url, "token")
            if len(data) > MAX_TOKEN_BYTES:
                response.close()  # the rest stays unread: this connection is not reused
            else:
                response.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            raise DownloadError(token_url, [(token_url, "direct", str(exc))]) from exc
        if response.status != 200:
            raise DownloadError(
                url, [(token_url, "direct", f"token request answered {response.status}")]
            )
        if len(data) > MAX_TOKEN_BYTES:
            raise DownloadError(url, [(token_url, "direct", "token answer over 1 MiB")])
        try:
            body = jsontext.loads(data)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise DownloadError(url, [(token_url, "direct", "token answer is not JSON")]) from exc
        if not isinstance(token, str) or not token:
            raise DownloadError(url, [(token_url, "direct", "token answer has no token")])
        self._tokens[scope] = token

    # -- requests ---------------------------------------------------------------------------------
    def _get(
        self,
        path: str,
        repository: str,
        headers: dict[str, str] | None = None,
        *,
        stream: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        url = f"{self.base_url}{path}"
        scope = f"repository:{repository}:pull"
        for attempt in range(2):
            all_headers = {**(headers or {}), **self._auth_header(scope)}
            try:
                response = self._http.request(
                    "GET", url, headers=all_headers, preload_content=not stream
                )
            except urllib3.exceptions.HTTPError as exc:
                reason = str(exc)
                if "WRONG_VERSION_NUMBER" in reason:
                    reason = "TLS handshake failed: a plain-HTTP registry? (--plain-http)"
                raise DownloadError(url, [(url, "direct", reason)]) from exc
            if response.status != 401 or attempt:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            response.drain_conn()
            self._answer_challenge(challenge, scope, url)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_document(
        self, response: urllib3.BaseHTTPResponse, limit: int, url: str, what: str
    ) -> bytes:
        """At most ``limit + 1`` bytes of a document's body (the caller refuses more), each
        receive seen by the low-speed rule: the socket's timeout alone lets a registry sending
        a byte now and then hold the round for as long as the document lasts. A body cut off
        or timed out is a :class:`DownloadError` (urllib3's own errors are outside the tree)."""
        speed = self._speed_check()
        parts: list[bytes] = []
        total = 0
        while total <= limit:
            try:
                data = response.read1(min(1 << 16, limit + 1 - total))
            except (urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
                reason = exc.args[0] if exc.args else type(exc).__name__  # cut off, timed out
                raise DownloadError(url, [(url, "direct", f"{what}: {reason}")]) from exc
            if not data:
                break
            parts.append(data)
            total += len(data)
            slow = speed.after(len(data))
            if slow:
                response.close()  # the rest is not waited for
                raise DownloadError(url, [(url, "direct", f"{what}: {slow}")])
        return b"".join(parts)

    @staticmethod
    def _fail(url: str, response: urllib3.BaseHTTPResponse, what: str) -> DownloadError:
        """The error for a refusal, quoting what one receive brought of its body: the rest
        (a GiB, or no end) is not read, and the connection is not used again."""
        try:
            body = response.read1(1024)[:300]
        except (urllib3.exceptions.HTTPError, OSError):
            body = b""  # the body is only an explanation
        finally:
            response.close()
        detail = body.decode("utf-8", "replace").strip()
        return DownloadError(
            what, [(url, "direct", f"HTTP {response.status}" + (f": {detail}" if detail else ""))]
        )

    def get_manifest(
        self, repository: str, reference: str, accept: tuple[str, ...] = MANIFEST_TYPES
    ) -> Fetched:
        """The manifest (or index) named by a tag or digest, digest-checked."""
        path = f"/v2/{repository}/manifests/{reference}"
        response = self._get(path, repository, {"Accept": ", ".join(accept)}, stream=True)
        url = f"{self.base_url}{path}"
        try:
            if response.status == 404:
                raise NotFoundError(f"{repository}:{reference}", self.registry)
            if response.status != 200:
                raise self._fail(url, response, f"manifest {repository}:{reference}")
            data = self._read_document(response, MAX_MANIFEST_BYTES, url, "manifest")
        finally:
            response.release_conn()
        if len(data) > MAX_MANIFEST_BYTES:
            raise FormatError(url, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type or media_type in ("application/json", "application/octet-stream"):
            try:
                media_type = str(jsontext.loads(data).get("mediaType") or "")
            except (ValueError, AttributeError):
                media_type = ""
        algorithm = reference.split(":", 1)[0] if _DIGEST_RE.fullmatch(reference) else "sha256"
        digest = _digest_of(data, algorithm)
        if _DIGEST_RE.fullmatch(reference) and digest != reference:
            raise IntegrityError(url, reference, digest)
        served = response.headers.get("Docker-Content-Digest")
        if served and served.startswith(f"{algorithm}:") and served != digest:
            raise IntegrityError(url, served, digest)
        return Fetched(data, media_type, digest)

    def list_tags(self, repository: str, *, limit: int = 10_000) -> list[str]:
        """The repository's tags (``GET /v2/<name>/tags/list``, following ``Link`` pages).

        Bounded by ``limit`` tags and :data:`MAX_MANIFEST_BYTES` per page, and each further page
        must bring a tag not seen before: a registry answering without end is an error, not a
        reason to wait.
        """
        path = f"/v2/{repository}/tags/list"
        found: set[str] = set()
        while path and len(found) < limit:
            response = self._get(path, repository, stream=True)
            url = f"{self.base_url}{path}"
            try:
                if response.status == 404:
                    raise NotFoundError(repository, self.registry)
                if response.status != 200:
                    raise self._fail(url, response, f"tags of {repository}")
                data = self._read_document(response, MAX_MANIFEST_BYTES, url, "tag list")
                link = response.headers.get("Link", "")
            finally:
                response.release_conn()
            if len(data) > MAX_MANIFEST_BYTES:
                raise FormatError(url, f"tag list larger than {MAX_MANIFEST_BYTES} bytes")
            try:
                page = jsontext.loads(data).get("tags") or []
            except (ValueError, AttributeError) as exc:
                raise FormatError(url, "tag list is not a JSON object") from exc
            if not isinstance(page, list):
                raise FormatError(url, "'tags' is not a list")
            new = {t for t in page if isinstance(t, str) and _TAG_RE.fullmatch(t)} - found
            found |= new
            match = re.match(r"\s*<(/v2/[^>]+)>", link)
            path = match.group(1) if match else ""
            if path and not new:  # a registry that pages on and on: nothing would end it
                raise FormatError(url, "tag list page links to a next one but brings no tag "
                                       "not seen before")  # fmt: skip
        return sorted(found)[:limit]

    @contextlib.contextmanager
    def open_blob(
        self,
        repository: str,
        digest: str,
        *,
        size: int | None = None,
        cancel: Cancellation | None = None,
    ) -> Iterator[VerifiedBlob]:
        """Blob ``digest`` as a stream, checked as it is read (for unpacking while downloading).

        The digest and size are checked when the stream reaches its end
        (:meth:`VerifiedBlob.finish` reads what the consumer left): whatever was made from the
        bytes must be thrown away if that raises. ``cancel`` stops the download from another
        thread (a read blocked on a stalled registry fails at once).
        """
        check_digest(digest)
        path = f"/v2/{repository}/blobs/{digest}"
        url = f"{self.base_url}{path}"
        if cancel is not None:
            cancel.check()
        try:
            with cancel.requests() if cancel is not None else contextlib.nullcontext():
                response = self._get(path, repository, stream=True)
        except RequestStopped:
            raise CancelledError from None
        try:
            if cancel is not None:
                cancel.watch(response)
            if response.status == 404:
                raise NotFoundError(f"blob {digest}", f"{self.registry}/{repository}")
            if response.status != 200:
                raise self._fail(url, response, f"blob {digest}")
            yield VerifiedBlob(response, digest, size, url, self._speed_check())
        except urllib3.exceptions.HTTPError as exc:
            raise DownloadError(f"blob {digest}", [(url, "direct", str(exc))]) from exc
        finally:
            if cancel is not None:
                cancel.forget(response)
            finish_response(response)  # pooled again only if the body was read to its end

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        *,
        size: int | None = None,
        cancel: Cancellation | None = None,
    ) -> Path:
        """Download blob ``digest`` to ``dest`` (atomically), checking size and digest.

        An existing ``dest`` of the right size is kept: blob files are named by digest and only
        ever written after verification, so one that exists is the blob. ``cancel``: as for
        :meth:`open_blob`.
        """
        check_digest(digest)
        dest = Path(dest)
        if dest.exists() and (size is None or dest.stat().st_size == size):
            return dest
        part = dest.with_name(dest.name + f".part-{os.getpid()}")
        buffer = memoryview(bytearray(1 << 20))
        try:
            # open_blob's reads return after one receive: the low-speed rule sees a slow
            # registry at once, not after a whole buffer has trickled in.
            with (
                self.open_blob(repository, digest, size=size, cancel=cancel) as blob,
                open(part, "wb") as out,
            ):
                while n := blob.readinto(buffer):
                    out.write(buffer[:n])
                blob.finish()
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return dest
