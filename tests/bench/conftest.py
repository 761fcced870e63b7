"""Fixtures for the benchmark harness tests: a small published benchmark environment."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator

import pytest

from cvmfs_ml.bench.environment import BenchEnvironment
from cvmfs_ml.bench.profiles import Profile
from cvmfs_ml.bench.zoo import ModelSpec

TINY_MODELS = (ModelSpec("mlp", "mlp"),
               ModelSpec("llm-4m", "llm", size=4 * 2**20, dtype="float32"),
               ModelSpec("st-1m", "safetensors", size=2**20, dtype="float16"))


def require_fuse() -> None:
    """Skip without a usable FUSE (fail in CI, which must provide it)."""
    usable = (os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)
              and importlib.util.find_spec("pyfuse3") is not None)
    if usable:
        return
    if os.environ.get("CI"):
        pytest.fail("FUSE (/dev/fuse and pyfuse3) is required in CI")
    pytest.skip("FUSE is not usable here")


def require_service(binary: str) -> None:
    """Skip when a service binary (nginx, squid, docker-registry) is missing; fail in CI."""
    from cvmfs_ml.testing import find_binary

    if find_binary(binary) is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{binary} is required in CI")
    pytest.skip(f"{binary} is not installed")


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchEnvironment]:
    """Tiny models built and published once per module; the built-in server as origin."""
    work = tmp_path_factory.mktemp("bench-env")
    profile = Profile(name="test", models=TINY_MODELS, repeats=1, inference_runs=2)
    with BenchEnvironment(work, profile, log=lambda _m: None) as env:
        env.build(TINY_MODELS)
        env.publish()
        env.start_origin()
        yield env



@pytest.fixture
def need_fuse() -> None:
    """Use in tests that mount: skips (or fails in CI) without FUSE."""
    require_fuse()


@pytest.fixture
def need_service() -> Callable[[str], None]:
    """``need_service("squid")`` skips (or fails in CI) when the binary is missing."""
    return require_service
