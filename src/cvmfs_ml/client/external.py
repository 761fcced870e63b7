"""External files (catalog flag 128): content served by plain web servers (cvmfs-format.md §10.4).

A repository can publish files whose bytes live outside ``data/``: the catalog holds their
hashes (and chunk lists), and clients fetch them from ``CVMFS_EXTERNAL_URL`` + the file's
repository path, through ``CVMFS_EXTERNAL_HTTP_PROXY``. A whole file is one ``GET``; a chunk is
a ``Range: bytes=offset-(offset+size-1)`` request. Every piece is still checked against its
catalog hash before it reaches the cache.

The external servers get a fetcher of their own: their failures (a 404 for a file not copied
there yet) must not move the repository's own fetcher off a healthy Stratum 1, and their
failover state is theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO
from urllib.parse import quote

from cvmfs_ml.client.config import DIRECT, ExternalConfig, parse_proxy_list, parse_server_urls
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.errors import ConfigError

__all__ = ["ExternalSource", "external_unset"]


def external_unset(path: str) -> ConfigError:
    """The error for an external file when no external server is configured."""
    return ConfigError(
        f"{path} is an external file (catalog flag 128), served from CVMFS_EXTERNAL_URL, "
        "which is not set: set CVMFS_EXTERNAL_URL (or pass external_url)"
    )


class ExternalSource:
    """Fetches external files from ``CVMFS_EXTERNAL_URL`` (``;``-separated, tried in order).

    ``proxy`` is ``CVMFS_EXTERNAL_HTTP_PROXY`` syntax (none: DIRECT). ``fetcher_options`` go to
    the :class:`~cvmfs_ml.client.fetcher.Fetcher` (timeouts, retries, pool size).
    """

    def __init__(
        self,
        urls: str,
        fqrn: str | None = None,
        *,
        proxy: str | Sequence[Sequence[str]] | None = None,
        **fetcher_options: Any,
    ) -> None:
        from cvmfs_ml.client.fetcher import Fetcher

        hosts = parse_server_urls(urls, fqrn)
        if not hosts:
            raise ConfigError("CVMFS_EXTERNAL_URL: no server URL")
        for host in hosts:
            if not host.startswith(("http://", "https://")):
                raise ConfigError(f"CVMFS_EXTERNAL_URL: {host!r} is not an http(s) URL")
        groups = (
            parse_proxy_list(proxy, "CVMFS_EXTERNAL_HTTP_PROXY")
            if isinstance(proxy, str)
            else proxy
        )
        self.fetcher = Fetcher(hosts, groups or [[DIRECT]], **fetcher_options)

    @classmethod
    def from_config(cls, config: ExternalConfig, fqrn: str | None = None) -> ExternalSource:
        """The external servers, proxies and timeouts of a client configuration."""
        return cls(
            config.urls,
            fqrn,
            proxy=config.proxy_groups,
            timeout=config.timeout,
            timeout_direct=config.timeout_direct,
        )

    @property
    def hosts(self) -> list[str]:
        return self.fetcher.hosts

    @property
    def stats(self) -> Any:
        return self.fetcher.stats

    def fetch_into(
        self,
        path: str,
        expected: Digest,
        compressed: bool,
        sink: BinaryIO,
        byte_range: tuple[int, int] | None = None,
        max_bytes: int | None = None,
    ) -> int:
        """Stream the verified bytes of ``path`` (a repository path, ``/a/b``) into ``sink``.

        ``byte_range=(offset, size)`` fetches one chunk with an HTTP ``Range`` request;
        ``max_bytes`` bounds the content as for any object (an external server is no more
        trusted than a Stratum 1).
        """
        rel = quote(path.lstrip("/").encode("utf-8", "surrogateescape"), safe="/")
        wanted = None
        if byte_range is not None:
            offset, size = byte_range
            wanted = (offset, offset + size - 1)
        return self.fetcher.fetch_into(
            rel, expected, compressed, sink, byte_range=wanted, max_bytes=max_bytes
        )

    def close(self) -> None:
        self.fetcher.close()
