"""Where a repository's objects come from: a location as users write it, turned into a source.

:meth:`Repository.connect <cvmfs_ml.client.repository.Repository.connect>` accepts a folder (a
Stratum 0/1 web root), upstream's ``CVMFS_SERVER_URL`` syntax (``;``-separated HTTP(S) URLs,
``@fqrn@``/``@org@``), an ``s3://`` Stratum 0, or an object store the caller already has; this
module picks the :class:`~cvmfs_ml.storage.base.ObjectSource` for each (the HTTP
:class:`~cvmfs_ml.client.fetcher.Fetcher` with its proxies and options, a
:class:`~cvmfs_ml.storage.local.LocalStore`, an S3 store) and the repository name, which always
comes from the caller or the location, never from the manifest being verified.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cvmfs_ml.client.config import DIRECT, folder_fqrn, parse_proxy_list, parse_server_urls
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.storage.base import ObjectSource

__all__ = ["FETCHER_OPTIONS", "load_keys", "open_source"]

FETCHER_OPTIONS = frozenset(
    {
        "timeout",
        "timeout_direct",
        "low_speed_limit",
        "max_retries",
        "backoff_init",
        "backoff_max",
        "follow_redirects",
        "pool_size",
        "proxy_reset_after",
        "host_reset_after",
        "user_agent",
        "rng",
    }
)
"""Keyword options of :meth:`Repository.connect` that configure the HTTP fetcher."""


def open_source(
    location: str | os.PathLike[str] | ObjectSource,
    fqrn: str | None,
    proxy: str | Sequence[Sequence[str]] | None,
    options: dict[str, Any],
) -> tuple[ObjectSource, str, bool]:
    """``(source, fqrn, owned)`` for ``location``; ``owned`` when this call created the source.

    Fetcher settings and ``s3_config`` are taken out of ``options`` (what is left is for the
    :class:`~cvmfs_ml.client.repository.Repository`).
    """
    fetcher_options = {k: options.pop(k) for k in list(options) if k in FETCHER_OPTIONS}
    s3_config = options.pop("s3_config", None)
    source: ObjectSource
    text = "" if not isinstance(location, (str, os.PathLike)) else os.fspath(location)
    if not text:
        # An object store the caller already has (a publisher's): read through it, not ours.
        source = location  # type: ignore[assignment]
        fqrn = fqrn or getattr(location, "fqrn", None)
        if not fqrn:
            raise ConfigError(f"{location!r}: pass the repository's fqrn")
        return source, fqrn, False
    if text.startswith("s3://"):
        from cvmfs_ml.storage.base import open_store

        source = open_store(text, s3_config)  # type: ignore[assignment]
        return source, fqrn or text.rstrip("/").rsplit("/", 1)[-1], True
    if "://" in text:
        from cvmfs_ml.client.fetcher import Fetcher

        if fqrn is None:
            first = next((u.strip() for u in text.split(";") if u.strip()), "")
            fqrn = urlsplit(first).path.rstrip("/").rsplit("/", 1)[-1]
            if not fqrn or "@" in fqrn:
                raise ConfigError(
                    f"CVMFS_SERVER_URL: cannot tell the repository name from {first!r}; "
                    "pass the fqrn"
                )
        groups = parse_proxy_list(proxy) if isinstance(proxy, str) else proxy
        source = Fetcher(parse_server_urls(text, fqrn), groups or [[DIRECT]], **fetcher_options)
        return source, fqrn, True
    from cvmfs_ml.storage.local import LocalStore

    if fetcher_options:
        raise ConfigError(f"{sorted(fetcher_options)} only apply to http(s) locations")
    folder = Path(text)
    # the folder's name, never the manifest's N
    return LocalStore(folder), fqrn or folder_fqrn(folder), True


def load_keys(public_key: str | os.PathLike[str] | Sequence[Any] | None) -> list[Any]:
    """Master public keys from a ``.pub`` file, a folder, ``a.pub:b.pub``, or already loaded."""
    if public_key is None:
        return []
    if isinstance(public_key, (str, os.PathLike)):
        return load_public_keys(public_key)
    return list(public_key)
