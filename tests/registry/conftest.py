"""Fixtures: two fresh repositories and a real registry server over them (see _helpers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.registry.config import add_token

from ._helpers import FQRNS, RegistryEnv, RegistryServer


@pytest.fixture
def registry_env(tmp_path: Path) -> Iterator[RegistryEnv]:
    settings = PublishSettings(
        compression=Compression.ZLIB, min_chunk_size=64 * 1024, avg_chunk_size=128 * 1024,
        max_chunk_size=256 * 1024, workers=2, ttl=15,
    )  # fmt: skip
    root = tmp_path / "srv"
    for fqrn in FQRNS:
        create_repository(root, fqrn, settings=settings)
    env = RegistryEnv(root, tmp_path / "registry.json", tmp_path / "data")
    env.tokens["writer"] = add_token(env.config, "writer", ["publish:grp"])
    env.tokens["all"] = add_token(env.config, "all", ["publish:*"])
    env.tokens["reader"] = add_token(env.config, "reader", ["read:grp"])
    env.tokens["other"] = add_token(env.config, "other", ["publish:other"])
    env.tokens["admin"] = add_token(env.config, "admin", ["admin"])
    env.set_config(cleanup_hour=-1)  # no daily cleanup at a wall-clock hour during a test
    yield env
    for server in env.servers:
        server.terminate()
    for server in env.servers:
        server.close()


@pytest.fixture
def registry(registry_env: RegistryEnv) -> RegistryServer:
    return registry_env.start()
