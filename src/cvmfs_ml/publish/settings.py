"""Publisher settings, stored in upstream's ``server.conf`` words (``KEY=value``).

They live beside the keys (``<keys>/<fqrn>.server.conf``), not in the served web root, and are
read by every publish: chunk sizes, compression, hash algorithm, TTL and the file-size limit are
properties of the repository, not of one command line.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
from dataclasses import dataclass, fields, replace
from pathlib import Path

from cvmfs_ml.cvmfs.chunking import ChunkParams
from cvmfs_ml.cvmfs.hashing import Algorithm
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.errors import ConfigError

__all__ = [
    "MAX_WHITELIST_DAYS",
    "PublishSettings",
    "load_settings",
    "save_settings",
    "settings_path",
    "whitelist_validity",
]

MAX_WHITELIST_DAYS = 3650
"""A whitelist is the master key's time-limited trust in a certificate: ten years is no limit."""


def whitelist_validity(days: float) -> dt.timedelta:
    """``days`` as a whitelist's validity; an expired whitelist (0 or fewer days) would lock
    every client out, and a huge one overflows the date."""
    if not 0 < days <= MAX_WHITELIST_DAYS:  # also refuses NaN
        raise ConfigError(f"a whitelist must be valid for more than 0 and at most "
                          f"{MAX_WHITELIST_DAYS} days, not {days:g}")  # fmt: skip
    return dt.timedelta(days=days)


# Upstream's variable for each field (cvmfs_server_coda.sh, server.conf).
_KEYS = {
    "compression": "CVMFS_COMPRESSION_ALGORITHM",
    "hash_algorithm": "CVMFS_HASH_ALGORITHM",
    "use_chunking": "CVMFS_USE_FILE_CHUNKING",
    "min_chunk_size": "CVMFS_MIN_CHUNK_SIZE",
    "avg_chunk_size": "CVMFS_AVG_CHUNK_SIZE",
    "max_chunk_size": "CVMFS_MAX_CHUNK_SIZE",
    "ttl": "CVMFS_REPOSITORY_TTL",
    "file_mbyte_limit": "CVMFS_FILE_MBYTE_LIMIT",
    "auto_tag": "CVMFS_AUTO_TAG",
    "garbage_collection": "CVMFS_GARBAGE_COLLECTION",
    "include_xattrs": "CVMFS_INCLUDE_XATTRS",
    "whitelist_days": "CVMFS_ML_WHITELIST_DAYS",
    "workers": "CVMFS_ML_PUBLISH_WORKERS",
    "auto_min_saving": "CVMFS_ML_AUTO_MIN_SAVING",
    "direct_writes": "CVMFS_ML_DIRECT_WRITES",
}


@dataclass(frozen=True)
class PublishSettings:
    """How a repository's content is written.

    ``compression='auto'`` (our default) stores a file uncompressed when zlib would save less
    than ``auto_min_saving`` of it: model weights save 7-8% and inflate at ~300 MB/s per thread,
    which makes zlib the largest cost of a cold load (performance-notes.md). ``file_mbyte_limit``
    is off (0) by default because model files are large; upstream warns above 1024 MB.

    ``direct_writes`` (a local repository's objects of 1 MiB and more written with
    ``O_DIRECT``, around the page cache): on by default, because filling the page cache is the
    largest cost of a publish on VMs whose host takes freed memory back (``docs/benchmarks.md``),
    and a publisher rarely reads its objects again. Off, they are written through the page
    cache, where the first reader (a Stratum 1's snapshot, a proxy's miss) finds them in
    memory: the better choice on a server with memory to spare and cheap pages.
    """

    compression: Compression = Compression.AUTO
    hash_algorithm: Algorithm = Algorithm.SHA1
    use_chunking: bool = True
    min_chunk_size: int = 4 * 2**20
    avg_chunk_size: int = 8 * 2**20
    max_chunk_size: int = 16 * 2**20
    ttl: int = 240
    file_mbyte_limit: int = 0
    auto_tag: bool = False
    garbage_collection: bool = True
    include_xattrs: bool = True
    whitelist_days: int = 30
    workers: int = 0  # 0: one per core
    auto_min_saving: float = 0.10
    direct_writes: bool = True

    def __post_init__(self) -> None:
        """Refuse values that would write a repository no client can use (an expired whitelist,
        a TTL the manifest cannot hold), before anything is written."""
        limits = {
            "ttl": (1, 2**32 - 1),  # the manifest's D field is an unsigned 32-bit number
            "whitelist_days": (1, MAX_WHITELIST_DAYS),
            "file_mbyte_limit": (0, 2**31),
            "workers": (0, 1024),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{_KEYS[name]} must be a whole number in {low}..{high}, "
                                  f"got {value!r}")  # fmt: skip
        if not 0.0 <= self.auto_min_saving <= 1.0:
            raise ConfigError(f"{_KEYS['auto_min_saving']} must be in 0..1, "
                              f"got {self.auto_min_saving!r}")  # fmt: skip
        if self.use_chunking:
            try:
                self.chunk_params  # noqa: B018 - validates the sizes and min < avg < max
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    @property
    def chunk_params(self) -> ChunkParams:
        return ChunkParams(self.min_chunk_size, self.avg_chunk_size, self.max_chunk_size)

    @property
    def worker_count(self) -> int:
        return self.workers or max(2, os.cpu_count() or 2)

    def with_(self, **changes: object) -> PublishSettings:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_conf(self) -> str:
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Compression):
                text = value.value
            elif isinstance(value, Algorithm):
                text = value.config_name
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            lines.append(f"{_KEYS[f.name]}={text}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_conf(cls, text: str, what: str = "server.conf") -> PublishSettings:
        by_key = {v: k for k, v in _KEYS.items()}
        values: dict[str, object] = {}
        defaults = cls()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            if not sep:
                raise ConfigError(f"{what}:{number}: expected KEY=value, got {raw!r}")
            name = by_key.get(key.strip())
            if name is None:
                continue  # upstream keys we do not use are kept out of our way
            value = " ".join(shlex.split(value)) if value.strip() else ""
            values[name] = _parse_value(name, value, getattr(defaults, name), what)
        try:
            return defaults.with_(**values)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{what}: {exc}") from exc


def _parse_value(name: str, value: str, default: object, what: str) -> object:
    try:
        if isinstance(default, Compression):
            return Compression("zlib" if value == "default" else value)
        if isinstance(default, Algorithm):
            return Algorithm.from_name(value)
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
        if isinstance(default, float):
            return float(value)
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {_KEYS[name]}={value!r} is not a valid value") from exc


def settings_path(keys_dir: Path, fqrn: str) -> Path:
    return keys_dir / f"{fqrn}.server.conf"


def load_settings(keys_dir: Path, fqrn: str) -> PublishSettings:
    path = settings_path(keys_dir, fqrn)
    if not path.exists():
        return PublishSettings()
    return PublishSettings.from_conf(path.read_text(), str(path))


def save_settings(keys_dir: Path, fqrn: str, settings: PublishSettings) -> Path:
    path = settings_path(keys_dir, fqrn)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(settings.to_conf())
    os.replace(tmp, path)
    return path
