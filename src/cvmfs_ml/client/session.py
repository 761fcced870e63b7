"""A :class:`~cvmfs_ml.client.repository.Repository` from a site's client configuration.

``mount``, the fsspec filesystem and the KServe integration all start from a
:class:`~cvmfs_ml.client.config.ClientConfig` (upstream's ``CVMFS_*`` settings), so the mapping
from settings to objects lives here once:

* ``CVMFS_SERVER_URL`` / ``CVMFS_HTTP_PROXY`` / timeouts / retries -> :meth:`Fetcher.from_config`;
* ``CVMFS_PUBLIC_KEY`` / ``CVMFS_KEYS_DIR`` -> the master keys that verify the whitelist;
* ``CVMFS_CACHE_BASE`` / ``CVMFS_SHARED_CACHE`` / ``CVMFS_QUOTA_LIMIT`` -> the shared
  :class:`~cvmfs_ml.client.cache.ObjectCache` (which also holds the rollback breadcrumb);
* ``CVMFS_ROOT_HASH`` or ``CVMFS_REPOSITORY_TAG`` pin a revision; ``CVMFS_MAX_TTL`` (minutes,
  as upstream) caps how long a revision is used before :meth:`Repository.maybe_refresh` looks
  for a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import ClientConfig, load_blacklist
from cvmfs_ml.client.fetcher import Fetcher
from cvmfs_ml.client.repository import FETCHER_OPTIONS, Repository
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.errors import ConfigError, FormatError

__all__ = ["max_ttl_seconds", "open_configured", "pinned_revision"]


def open_configured(fqrn: str, config: ClientConfig, **options: Any) -> Repository:
    """Connect to ``fqrn`` as ``config`` says and verify it; the caller closes the result.

    ``options`` override the configuration: fetcher settings (``timeout``, ``max_retries``,
    ``pool_size``...), ``cache`` (an :class:`ObjectCache`), ``root_hash``, ``tag``, ``now``, and
    any other :class:`Repository` keyword.
    """
    if config.fqrn is not None and config.fqrn != fqrn:
        raise ConfigError(f"the configuration was loaded for {config.fqrn}, not {fqrn}")
    if not config.public_keys:
        raise ConfigError(
            f"no master public key for {fqrn}: set CVMFS_PUBLIC_KEY (a .pub file) "
            "or CVMFS_KEYS_DIR (a folder of them)"
        )
    keys = load_public_keys(config.public_keys)
    overrides = {k: options.pop(k) for k in list(options) if k in FETCHER_OPTIONS}
    params = config.params
    if "root_hash" not in options and "tag" not in options:
        options.update(pinned_revision(params))
    max_ttl = max_ttl_seconds(params.get("CVMFS_MAX_TTL", ""))
    if "blacklist" not in options:  # CVMFS_BLACKLIST may come from a configuration file
        options["blacklist"] = load_blacklist(params.get("CVMFS_BLACKLIST", "").strip() or None)
    cache = options.pop("cache", None)
    own_cache = cache is None
    if cache is None:
        cache = ObjectCache(config.cache_dir, config.quota_bytes)
    fetcher = Fetcher.from_config(config, **overrides)
    try:
        repository = Repository(fetcher, fqrn, public_keys=keys, cache=cache, **options)
    except BaseException:
        fetcher.close()
        if own_cache:
            cache.close()
        raise
    repository.max_ttl = max_ttl
    return repository


def pinned_revision(params: Mapping[str, str]) -> dict[str, Any]:
    """``root_hash`` or ``tag`` for :class:`Repository` from ``CVMFS_ROOT_HASH`` (first) or
    ``CVMFS_REPOSITORY_TAG``; empty when neither pins the repository."""
    root_hash = params.get("CVMFS_ROOT_HASH", "").strip()
    tag = params.get("CVMFS_REPOSITORY_TAG", "").strip()
    if root_hash:
        try:
            return {"root_hash": Digest.from_hex(root_hash)}
        except FormatError as exc:
            raise ConfigError(f"CVMFS_ROOT_HASH: {root_hash!r} is not a hash") from exc
    return {"tag": tag} if tag else {}


def max_ttl_seconds(text: str) -> float | None:
    """``CVMFS_MAX_TTL`` in seconds (upstream gives minutes; 0 or unset means no cap)."""
    text = text.strip()
    if not text:
        return None
    try:
        minutes = float(text)
    except ValueError:
        raise ConfigError(f"CVMFS_MAX_TTL: {text!r} is not a number of minutes") from None
    if minutes < 0:
        raise ConfigError(f"CVMFS_MAX_TTL: {text!r} must not be negative")
    return minutes * 60 if minutes > 0 else None
