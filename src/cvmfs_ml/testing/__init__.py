"""Real services on loopback for tests and benchmarks: nginx, Squid, docker-registry, moto's S3.

The engine must work with the servers a site really runs, and a benchmark that claims "this is
what loading through CVMFS costs" must use them too, configured as the documentation says. So
both start the real binaries from Debian (``nginx-light``, ``squid``, ``docker-registry``) and
moto's standalone S3 server instead of mocks or stand-ins. This package is the one
implementation: the test suite (fixtures in ``tests/conftest.py``) and the benchmark harness
(:mod:`cvmfs_ml.bench`) import it; the product layers never do (``tests/test_layering.py``).

* :mod:`~cvmfs_ml.testing.service` - the process base class, free ports, binaries, log waits.
* :mod:`~cvmfs_ml.testing.accesslog` - access-log records and parsers, origin counters.
* :mod:`~cvmfs_ml.testing.nginx`, :mod:`~cvmfs_ml.testing.squid`,
  :mod:`~cvmfs_ml.testing.docker_registry`, :mod:`~cvmfs_ml.testing.moto_s3` - one module per
  service, each with the configuration template it writes.
* :mod:`~cvmfs_ml.testing.netem` - the userspace delay/rate proxy that stands in for tc netem
  (not re-exported here: import it from its module).

This package does not import pytest.
"""

from __future__ import annotations

from cvmfs_ml.testing.accesslog import (
    NGINX_LOG_FORMAT,
    AccessRecord,
    OriginCounters,
    SquidRecord,
    parse_nginx_access_log,
    parse_nginx_log,
    parse_squid_access_log,
    parse_squid_log,
)
from cvmfs_ml.testing.docker_registry import (
    DockerRegistry,
    NotifyingDockerRegistry,
    registry_config,
)
from cvmfs_ml.testing.moto_s3 import MotoS3
from cvmfs_ml.testing.nginx import Nginx, nginx_main_config, nginx_site_config
from cvmfs_ml.testing.service import (
    LOOPBACK,
    LoggedService,
    Service,
    ServiceError,
    available,
    find_binary,
    free_port,
)
from cvmfs_ml.testing.squid import CVMFS_SQUID_POLICY, Squid, squid_config

__all__ = [
    "CVMFS_SQUID_POLICY",
    "LOOPBACK",
    "LoggedService",
    "NGINX_LOG_FORMAT",
    "AccessRecord",
    "DockerRegistry",
    "MotoS3",
    "Nginx",
    "NotifyingDockerRegistry",
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
