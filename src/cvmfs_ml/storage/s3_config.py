"""Where and how a Stratum 0 in S3 is reached: ``s3://BUCKET[/PREFIX]/FQRN`` locations and
upstream's uploader settings (``CVMFS_S3_*``), as :class:`S3Config`.

:class:`~cvmfs_ml.storage.s3.S3Store` is opened with the two.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cvmfs_ml.errors import ConfigError

__all__ = ["S3Config", "parse_s3_location"]

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def parse_s3_location(location: str) -> tuple[str, str, str]:
    """``s3://BUCKET[/PREFIX]/FQRN`` -> (bucket, key prefix ending in ``/``, fqrn)."""
    if not location.startswith("s3://"):
        raise ConfigError(f"{location!r} is not an s3://BUCKET[/PREFIX]/FQRN location")
    parts = [p for p in location[len("s3://") :].split("/") if p]
    if len(parts) < 2:
        raise ConfigError(f"{location!r}: expected s3://BUCKET[/PREFIX]/FQRN")
    bucket, fqrn = parts[0], parts[-1]
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(f"{location!r}: {bucket!r} is not a valid S3 bucket name")
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"{location!r}: '.' and '..' are not allowed")
    return bucket, "/".join(parts[1:]) + "/", fqrn


def _flag(params: Mapping[str, str], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


def _int(params: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    value = params.get(key)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value)
    except ValueError as exc:
        raise ConfigError(f"{key}={value!r}: expected a whole number") from exc
    if number < minimum:
        raise ConfigError(f"{key}={value!r}: must be at least {minimum}")
    return number


@dataclass(frozen=True)
class S3Config:
    """Upstream's S3 uploader settings (``CVMFS_S3_*`` in ``/etc/cvmfs/repositories.d``)."""

    host: str
    port: int
    bucket: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    dns_buckets: bool = True
    use_https: bool = False
    region: str = "us-east-1"
    flavor: str = "awsv4"
    max_connections: int = 400
    max_retries: int = 3
    timeout: int = 60
    acl: str = "public-read"
    peek_before_put: bool = True
    proxy: str | None = None
    spool_dir: Path | None = None
    multipart_threshold: int = 64 * 2**20
    multipart_chunk: int = 16 * 2**20

    @classmethod
    def from_params(cls, params: Mapping[str, str] | None = None) -> S3Config:
        """From ``KEY=value`` settings (a parsed ``--s3-config`` file), or the environment."""
        params = dict(os.environ if params is None else params)
        host = params.get("CVMFS_S3_HOST", "").strip()
        if not host:
            raise ConfigError(
                "CVMFS_S3_HOST is not set: pass --s3-config FILE or set CVMFS_S3_* variables"
            )
        use_https = _flag(params, "CVMFS_S3_USE_HTTPS", False)
        flavor = params.get("CVMFS_S3_FLAVOR", "awsv4").strip() or "awsv4"
        if flavor not in ("awsv2", "awsv4"):
            raise ConfigError(f"CVMFS_S3_FLAVOR={flavor!r}: expected awsv2 or awsv4")
        spool = params.get("CVMFS_SPOOL_DIR", "").strip()
        return cls(
            host=host,
            port=_int(params, "CVMFS_S3_PORT", 443 if use_https else 80, 1),
            bucket=params.get("CVMFS_S3_BUCKET") or None,
            access_key=params.get("CVMFS_S3_ACCESS_KEY") or None,
            secret_key=params.get("CVMFS_S3_SECRET_KEY") or None,
            dns_buckets=_flag(params, "CVMFS_S3_DNS_BUCKETS", True),
            use_https=use_https,
            region=params.get("CVMFS_S3_REGION", "").strip() or "us-east-1",
            flavor=flavor,
            max_connections=_int(params, "CVMFS_S3_MAX_NUMBER_OF_PARALLEL_CONNECTIONS", 400, 1),
            max_retries=_int(params, "CVMFS_S3_MAX_RETRIES", 3, 0),
            timeout=_int(params, "CVMFS_S3_TIMEOUT", 60, 1),
            acl=params.get("CVMFS_S3_X_AMZ_ACL", "public-read").strip(),
            peek_before_put=_flag(params, "CVMFS_S3_PEEK_BEFORE_PUT", True),
            proxy=params.get("CVMFS_S3_PROXY", "").strip() or None,
            spool_dir=Path(spool) if spool else None,
        )

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.use_https else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def public_url(self, bucket: str, key_prefix: str) -> str:
        """The plain HTTP URL clients read the repository from (no credentials)."""
        scheme = "https" if self.use_https else "http"
        if self.dns_buckets:
            return f"{scheme}://{bucket}.{self.host}:{self.port}/{key_prefix.rstrip('/')}"
        return f"{self.endpoint}/{bucket}/{key_prefix.rstrip('/')}"
