"""Turn what a user names (a URL, a repository folder, or just a FQRN) into an open Repository.

``cvmfs-ml mount``, ``cvmfs-ml warm`` and ``cvmfs://<fqrn>/...`` (fsspec) all accept the same
three spellings, and a FQRN alone must work the way it does for upstream's client: servers,
proxies, keys and cache come from the configuration (``CVMFS_SERVER_URL``, ``CVMFS_HTTP_PROXY``,
``CVMFS_KEYS_DIR``/``CVMFS_PUBLIC_KEY``, ``CVMFS_CACHE_BASE``, ``CVMFS_QUOTA_LIMIT``; files from
``--config`` or ``CVMFS_ML_CONFIG``). Explicit arguments win over the configuration.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import (
    ClientConfig,
    external_config,
    folder_fqrn,
    load_blacklist,
    load_config,
    parse_proxy_list,
)
from cvmfs_ml.client.external import ExternalSource
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.client.session import max_ttl_seconds, pinned_revision
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.errors import ConfigError

__all__ = ["is_url", "local_default_key", "open_target", "target_fqrn"]


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def local_default_key(folder: Path) -> Path | None:
    """``ROOT/../keys/<fqrn>.pub`` for a repository at ``ROOT/<fqrn>`` (where ``repo create``
    puts keys, docs/cli.md); ``None`` when it is not there."""
    if not (folder / ".cvmfspublished").is_file():
        return None
    candidate = folder.resolve().parent.parent / "keys" / f"{folder_fqrn(folder)}.pub"
    return candidate if candidate.is_file() else None


def target_fqrn(target: str) -> str | None:
    """The repository name a target implies: the URL's last segment, the folder's name, or the
    name itself; never the manifest's ``N`` (that is what gets verified against it)."""
    if is_url(target):
        return target.split(";")[0].rstrip("/").rsplit("/", 1)[-1] or None
    folder = Path(target)
    if (folder / ".cvmfspublished").is_file():
        return folder_fqrn(folder)
    return target or None


def _cache_for(
    cache: ObjectCache | str | os.PathLike[str] | None, config: ClientConfig | None
) -> ObjectCache | None:
    if isinstance(cache, ObjectCache):
        return cache
    if cache is not None:
        quota = config.quota_bytes if config is not None else None
        return ObjectCache(Path(cache), quota)
    if config is not None:
        return ObjectCache(config.cache_dir, config.quota_bytes)
    return None


def _upstream_reading(
    options: dict[str, Any], config: ClientConfig, env: Mapping[str, str]
) -> None:
    """Fill in how upstream reads entries: ``$(VAR)`` link expansion from the environment and
    the configuration (upstream exports its parameters), and ``CVMFS_EXTERNAL_URL``."""
    fqrn = {"CVMFS_FQRN": config.fqrn} if config.fqrn else {}  # upstream sets it, too
    options.setdefault("symlink_variables", {**env, **config.params, **fqrn})
    external = external_config(config.params)
    if external is not None and "external_url" not in options:
        options.setdefault("external_source", ExternalSource.from_config(external, config.fqrn))


def open_target(
    target: str,
    *,
    fqrn: str | None = None,
    public_key: str | os.PathLike[str] | None = None,
    cache: ObjectCache | str | os.PathLike[str] | None = None,
    proxy: str | None = None,
    config_files: Sequence[str | os.PathLike[str]] = (),
    env: Mapping[str, str] = os.environ,
    use_config_cache: bool = True,
    **options: Any,
) -> Repository:
    """Open ``target``: an ``http(s)://.../cvmfs/<fqrn>`` URL (``;`` list), a local repository
    folder, or a FQRN resolved through the configuration.

    For a URL or folder the configuration (if it names keys or a cache for that FQRN) only
    fills in what is not given; a local folder falls back to the keys ``repo create`` wrote.
    ``use_config_cache=False`` keeps a private temporary cache when ``cache`` is not given.
    ``fqrn`` is the repository the manifest must belong to where the caller names it (a
    mirror's URL or folder need not end in it); else the target implies it (:func:`target_fqrn`).
    ``options`` go to :class:`Repository` (``tag``, ``tracer``, ``prefetch_workers``...).
    """
    fqrn = fqrn or target_fqrn(target)
    local = not is_url(target) and (Path(target) / ".cvmfspublished").is_file()
    try:
        config: ClientConfig | None = load_config(fqrn, list(config_files), env)
    except ConfigError:
        if not (is_url(target) or local):
            raise
        config = None  # a URL or folder does not need the configuration to be complete
    object_cache = _cache_for(cache, config if (use_config_cache or cache is not None) else None)
    if config is not None and options.get("root_hash") is None and options.get("tag") is None:
        options.update(pinned_revision(config.params))  # CVMFS_ROOT_HASH, CVMFS_REPOSITORY_TAG
    if config is not None:
        _upstream_reading(options, config, env)

    if is_url(target) or local:
        key: Any = public_key
        if key is None and config is not None and config.public_keys:
            key = [str(p) for p in config.public_keys]
        if key is None and local:
            key = local_default_key(Path(target))
        if key is None:
            raise ConfigError(f"no public key for {target}: pass the <fqrn>.pub file")
        keys = load_public_keys(key)
        if is_url(target):
            workers = int(options.setdefault(
                "prefetch_workers", config.parallel if config is not None else 8))  # fmt: skip
            options.setdefault("pool_size", workers)  # one keep-alive connection per worker
            if config is not None:
                if proxy is None:
                    proxy = ";".join("|".join(group) for group in config.proxy_groups)
                for name in ("timeout", "timeout_direct", "max_retries", "backoff_init",
                             "backoff_max", "follow_redirects", "proxy_reset_after",
                             "host_reset_after", "low_speed_limit"):  # fmt: skip
                    options.setdefault(name, getattr(config, name))
        return _with_max_ttl(Repository.open(
            target, fqrn=fqrn, public_key=keys,
            cache=object_cache, proxy=proxy, **options,
        ), config)  # fmt: skip

    if config is None or fqrn is None:  # pragma: no cover - load_config raised above
        raise ConfigError(f"{target!r} is not a URL, a repository folder or a repository name")
    if not config.server_urls:
        raise ConfigError(
            f"{target!r} is not a URL or a repository folder, and no CVMFS_SERVER_URL is"
            " configured for it (--config FILE or CVMFS_ML_CONFIG)"
        )
    if proxy is not None:
        config = dataclasses.replace(config, proxy_groups=parse_proxy_list(proxy))
    from cvmfs_ml.client.fetcher import Fetcher

    key_spec: Any = public_key if public_key is not None else [str(p) for p in config.public_keys]
    if not key_spec:
        raise ConfigError(f"no public key for {fqrn}: set CVMFS_KEYS_DIR or CVMFS_PUBLIC_KEY")
    workers = int(options.pop("prefetch_workers", config.parallel))
    if "blacklist" not in options:  # CVMFS_BLACKLIST may come from a configuration file
        options["blacklist"] = load_blacklist(
            config.params.get("CVMFS_BLACKLIST", "").strip() or None
        )
    source = Fetcher.from_config(config, pool_size=max(workers, 1))
    repository = Repository(
        source,
        fqrn,
        public_keys=load_public_keys(key_spec),
        cache=object_cache,
        prefetch_workers=workers,
        **options,
    )
    return _with_max_ttl(repository, config)


def _with_max_ttl(repository: Repository, config: ClientConfig | None) -> Repository:
    """Cap the repository's TTL by ``CVMFS_MAX_TTL`` (minutes, as upstream; 0 or unset: none)."""
    if config is not None:
        try:
            repository.max_ttl = max_ttl_seconds(config.params.get("CVMFS_MAX_TTL", ""))
        except ConfigError:
            repository.close()
            raise
    return repository
