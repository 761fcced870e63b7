"""Real services (nginx, Squid, docker-registry) on loopback, for integration tests.

The implementation is :mod:`cvmfs_ml.bench.services`, shared with the benchmark harness (the
installed package cannot import tests, so the code lives there); this module re-exports it so
tests keep writing ``from services import Nginx, Squid, ...`` (``tests/`` is on ``sys.path``).
It does not import pytest; the fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

from cvmfs_ml.bench.services import (
    CVMFS_SQUID_POLICY,
    LOOPBACK,
    NGINX_LOG_FORMAT,
    AccessRecord,
    DockerRegistry,
    Nginx,
    OriginCounters,
    Service,
    ServiceError,
    Squid,
    SquidRecord,
    available,
    find_binary,
    free_port,
    nginx_main_config,
    nginx_site_config,
    parse_nginx_access_log,
    parse_nginx_log,
    parse_squid_access_log,
    parse_squid_log,
    registry_config,
    squid_config,
)

__all__ = [
    "CVMFS_SQUID_POLICY",
    "LOOPBACK",
    "NGINX_LOG_FORMAT",
    "AccessRecord",
    "DockerRegistry",
    "Nginx",
    "OriginCounters",
    "Service",
    "ServiceError",
    "Squid",
    "SquidRecord",
    "available",
    "find_binary",
    "free_port",
    "nginx_main_config",
    "nginx_site_config",
    "parse_nginx_access_log",
    "parse_nginx_log",
    "parse_squid_access_log",
    "parse_squid_log",
    "registry_config",
    "squid_config",
]
