"""The S3 store against an endpoint that answers badly: a small threaded HTTP server on loopback
plays it (moto, in test_s3.py, only answers well). A body far larger than the file, a body cut
short, redirects, and a listing whose continuation tokens go round in circles each end in one of
our errors, within bounded memory and time.
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_ml.errors import CvmfsMlError, FormatError, StorageError
from cvmfs_ml.storage.s3 import S3Store
from cvmfs_ml.storage.s3_config import S3Config
from quiet_http import QuietHTTPServer


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:
        mode, query = self.server.mode, urllib.parse.urlparse(self.path).query
        with self.server.lock:
            self.server.requests += 1
        if "list-type=2" in query and mode == "no-size":  # a key without its Size
            return self._xml(
                "<ListBucketResult><Name>bucket</Name><IsTruncated>false</IsTruncated>"
                "<Contents><Key>stratum0/hostile.test/data/ab/cdef</Key></Contents>"
                "</ListBucketResult>"
            )
        if "list-type=2" in query:
            return self._listing(urllib.parse.parse_qs(query))
        if query.startswith("uploads"):  # an upload without its Initiated date
            return self._xml(
                "<ListMultipartUploadsResult><Bucket>bucket</Bucket>"
                "<Upload><Key>stratum0/hostile.test/data/ab/cdef</Key><UploadId>u1</UploadId>"
                "</Upload></ListMultipartUploadsResult>"
            )
        if mode == "endless":  # chunked, no length: 1 MiB pieces until the reader hangs up
            # (256 MiB at most: a store that reads it all fails the test, not the machine)
            self._head(200, {"Transfer-Encoding": "chunked"})
            piece = b"%x\r\n%s\r\n" % (2**20, b"\0" * 2**20)
            try:
                while self.server.sent < 256 * 2**20:
                    self.wfile.write(piece)
                    self.server.sent += 2**20
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            self.close_connection = True
        elif mode == "declared-huge":
            self._head(200, {"Content-Length": str(2**40)})
            self.close_connection = True
        elif mode == "cut":
            self._head(200, {"Content-Length": "1000"})
            self.wfile.write(b"x" * 10)
            self.close_connection = True
        elif mode == "redirect":
            self._head(302, {"Location": f"http://127.0.0.1:{self.server.server_port}/elsewhere",
                             "Content-Length": "0"})  # fmt: skip

    do_HEAD = do_GET

    def _xml(self, text: str) -> None:
        body = ('<?xml version="1.0" encoding="UTF-8"?>' + text).encode()
        self._head(200, {"Content-Length": str(len(body)), "Content-Type": "application/xml"})
        self.wfile.write(body)

    def _listing(self, query: dict[str, list[str]]) -> None:
        token = query.get("continuation-token", ["A"])[0]
        # Tokens A, B, A, B...; after 1000 pages the listing ends, so a store that does not
        # notice the circle finishes (and the test fails) instead of hanging.
        with self.server.lock:
            self.server.pages += 1
            more = self.server.pages < 1000
        truncated = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{'B' if token == 'A' else 'A'}</NextContinuationToken>"  # noqa: E501
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bucket</Name>'
            "<KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
            + (truncated if more else "<IsTruncated>false</IsTruncated>")
            + "</ListBucketResult>"
        ).encode()
        self._head(200, {"Content-Length": str(len(body)), "Content-Type": "application/xml"})
        self.wfile.write(body)


class _Server(QuietHTTPServer):

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.lock = "", threading.Lock()
        self.requests = self.pages = self.sent = 0


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[tuple[_Server, S3Store]]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = S3Config.from_params({
        "CVMFS_S3_HOST": "127.0.0.1", "CVMFS_S3_PORT": str(server.server_port),
        "CVMFS_S3_ACCESS_KEY": "a", "CVMFS_S3_SECRET_KEY": "b", "CVMFS_S3_DNS_BUCKETS": "false",
        "CVMFS_S3_TIMEOUT": "30", "CVMFS_S3_MAX_RETRIES": "0", "CVMFS_SPOOL_DIR": str(tmp_path),
    })  # fmt: skip
    store = S3Store("s3://bucket/stratum0/hostile.test", config)
    try:
        yield server, store
    finally:
        store.close()
        server.shutdown()
        server.server_close()


def test_a_manifest_larger_than_any_manifest_is_refused_unread(
    endpoint: tuple[_Server, S3Store],
) -> None:
    """A 1 TiB Content-Length for ``.cvmfspublished`` was read into memory (500 MiB took 551 MB
    RSS); now 64 KiB is the most, checked on the declared length before reading."""
    server, store = endpoint
    server.mode = "declared-huge"
    with pytest.raises(FormatError, match="declares 1099511627776 bytes, over 65536"):
        store.get_bytes(".cvmfspublished")


def test_an_endless_body_stops_one_byte_past_the_bound(endpoint: tuple[_Server, S3Store]) -> None:
    server, store = endpoint
    server.mode = "endless"
    with pytest.raises(FormatError, match="sent more than 65536 bytes"):
        store.get_bytes(".cvmfspublished")
    assert server.sent < 64 * 2**20  # read a little, not the 256 MiB the server would send


def test_a_cut_body_is_a_storage_error(endpoint: tuple[_Server, S3Store]) -> None:
    """botocore's ResponseStreamingError escaped as it was (a traceback in the CLI)."""
    server, store = endpoint
    server.mode = "cut"
    with pytest.raises(StorageError, match="broke off after 10 of 1000 bytes"):
        store.get_bytes(".cvmfspublished")
    with pytest.raises(StorageError, match="broke off"):
        store.get_bytes(".cvmfsreflog")


def test_redirects_are_reported_not_followed(endpoint: tuple[_Server, S3Store]) -> None:
    """botocore's region redirector asked the redirecting endpoint for the bucket's region
    again and again, until RecursionError (a few hundred requests later)."""
    server, store = endpoint
    server.mode = "redirect"
    for call in (lambda: store.get_bytes(".cvmfspublished"), lambda: store.exists("data/ab/c")):
        with pytest.raises(StorageError, match=r"redirected \(302\) to '.*/elsewhere'"):
            call()
    assert server.requests == 2


def test_a_listing_going_round_in_circles_stops(endpoint: tuple[_Server, S3Store]) -> None:
    """botocore notices a token repeated at once, not tokens alternating A, B, A, B..."""
    server, store = endpoint
    with pytest.raises(StorageError, match="does not advance"):
        list(store.list_sizes())
    assert server.pages == 3


def test_every_failure_here_is_ours(endpoint: tuple[_Server, S3Store]) -> None:
    server, store = endpoint
    for mode in ("declared-huge", "cut", "redirect"):
        server.mode = mode
        with pytest.raises(CvmfsMlError):
            store.fetch(".cvmfspublished", None, compressed=False, max_bytes=100)


def test_answers_missing_their_fields_are_ours(endpoint: tuple[_Server, S3Store]) -> None:
    """botocore leaves out what an answer does not carry: a listed key without ``Size`` and a
    multipart upload without ``Initiated`` were a raw KeyError (a traceback from any publish,
    whose start cleans abandoned uploads, and from gc)."""
    server, store = endpoint
    assert store.clean_staging() == 0  # an upload of unknown age is not abandoned: left alone
    assert server.requests == 1
    server.mode = "no-size"
    with pytest.raises(StorageError, match="no Size"):
        list(store.list_sizes())
