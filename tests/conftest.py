"""Shared pytest fixtures for the whole test suite.

Two groups: the upstream-written reference repository, and real services on loopback
(``nginx_factory``, ``reference_nginx``, ``squid_factory``, ``docker_registry``; the processes
themselves are in :mod:`cvmfs_ml.testing`).

The upstream-written reference repository (``shared/fixtures/cvmfs-reference-repo`` beside the
checkout) is the ground truth for format tests. ``CVMFS_ML_REFERENCE_REPO`` overrides its location
so the suite also runs from an installed copy or a CI workspace with a different layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_ml.testing import DockerRegistry, MotoS3, Nginx, Service, Squid, find_binary

_DEFAULT_REFERENCE_REPO = (
    Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "cvmfs-reference-repo"
)

REFERENCE_REPO = Path(os.environ.get("CVMFS_ML_REFERENCE_REPO", _DEFAULT_REFERENCE_REPO))
"""Root of the reference fixture: ``README.md``, ``keys/`` and ``cvmfs/ref.test.local/``."""

REFERENCE_FQRN = "ref.test.local"


@pytest.fixture(scope="session")
def reference_repo() -> Path:
    """The reference fixture root; tests that need it skip when it is not present."""
    if not (REFERENCE_REPO / "cvmfs" / REFERENCE_FQRN / ".cvmfspublished").is_file():
        pytest.skip(f"reference repository not found at {REFERENCE_REPO}")
    return REFERENCE_REPO


@pytest.fixture(scope="session")
def reference_served(reference_repo: Path) -> Path:
    """The served directory of the reference repository (``.../cvmfs/ref.test.local``)."""
    return reference_repo / "cvmfs" / REFERENCE_FQRN


# --------------------------------------------------------------------------------------------
# Real services on loopback (nginx, Squid, docker-registry); see cvmfs_ml.testing.
# Tests that use these fixtures are marked ``@pytest.mark.service``. A missing binary skips the
# test on a developer machine but fails it in CI (``CI`` set), where .ci/run installs them all.
# --------------------------------------------------------------------------------------------


def require_binary(binary: str) -> None:
    """Skip the calling test when ``binary`` is missing, or fail it when running in CI."""
    if find_binary(binary) is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{binary} is not installed; CI must provide it (see .ci/run)")
    pytest.skip(f"{binary} is not installed")


@pytest.fixture
def nginx_binary() -> str:
    """Path of the nginx binary (skips, or fails in CI, when it is missing)."""
    require_binary("nginx")
    return str(find_binary("nginx"))


@pytest.fixture
def squid_binary() -> str:
    """Path of the squid binary (skips, or fails in CI, when it is missing)."""
    require_binary("squid")
    return str(find_binary("squid"))


def _close_all(services: list[Service]) -> None:
    # Signal every service first so their shutdowns overlap (Squid needs about a second).
    for service in services:
        service.terminate()
    for service in services:
        service.close()


@pytest.fixture
def nginx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Nginx]]:
    """``start(root, port=None) -> Nginx``: nginx serving ``root`` (``root/cvmfs/<fqrn>/``)."""
    require_binary("nginx")
    started: list[Service] = []

    def start(root: Path, port: int | None = None) -> Nginx:
        server = Nginx(root, port=port, workdir=tmp_path_factory.mktemp("nginx"))
        started.append(server)
        return server

    yield start
    _close_all(started)


@pytest.fixture
def reference_nginx(nginx_factory: Callable[..., Nginx], reference_repo: Path) -> Nginx:
    """nginx serving the reference repository; ``.repo_url(REFERENCE_FQRN)`` is its URL."""
    return nginx_factory(reference_repo)


@pytest.fixture
def squid_factory() -> Iterator[Callable[..., Squid]]:
    """``start(parent=None, port=None, cache_mem_mb=256, maximum_object_size_mb=1024) -> Squid``.

    Each call starts a fresh Squid with an empty memory cache; ``parent`` chains them.
    """
    require_binary("squid")
    started: list[Service] = []

    def start(
        parent: Squid | tuple[str, int] | None = None,
        port: int | None = None,
        cache_mem_mb: int = 256,
        maximum_object_size_mb: int = 1024,
    ) -> Squid:
        proxy = Squid(
            parent=parent,
            port=port,
            cache_mem_mb=cache_mem_mb,
            maximum_object_size_mb=maximum_object_size_mb,
        )
        started.append(proxy)
        return proxy

    yield start
    _close_all(started)


@pytest.fixture
def docker_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    """An empty docker-registry on loopback (``.url``, ``.host`` for image references)."""
    require_binary("docker-registry")
    registry = DockerRegistry(workdir=tmp_path_factory.mktemp("registry"))
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """moto's standalone S3 server on a free loopback port (``.url``, ``.s3_params(bucket)``).

    One server for the session (it starts in about a second); tests make their own buckets.
    """
    require_binary("moto_server")
    server = MotoS3(workdir=tmp_path_factory.mktemp("moto"))
    yield server
    server.close()
