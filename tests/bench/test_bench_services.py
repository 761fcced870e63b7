"""The benchmark's nginx/Squid: same configuration as the tests and docs, working counters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3

from cvmfs_ml import testing as services
from cvmfs_ml.bench.concurrency import run_concurrency
from cvmfs_ml.bench.environment import BenchEnvironment
from cvmfs_ml.bench.profiles import FQRN
from cvmfs_ml.errors import CvmfsMlError

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_test_suite_runs_the_benchmark_services(tmp_path: Path) -> None:
    # One implementation (cvmfs_ml.testing), so tests, benchmarks and (through
    # tests/storage/test_services.py) docs/nginx.conf and docs/squid.conf agree.
    assert issubclass(services.ServiceError, CvmfsMlError)
    squid_doc = (DOCS / "squid.conf").read_text()
    assert all(line in squid_doc for line in services.CVMFS_SQUID_POLICY)
    config = services.squid_config(
        http_port="127.0.0.1:3128", workdir=tmp_path, service_user=None, visible_hostname="x",
        cache_mem_mb=256, maximum_object_size_mb=1024, maximum_object_size_in_memory_mb=256)
    assert all(f"\n{line}\n" in config for line in services.CVMFS_SQUID_POLICY)


def test_log_parsers() -> None:
    line = ('127.0.0.1 - [2026-01-01T00:00:00+00:00] "GET /cvmfs/x/data/ab/cd HTTP/1.1" 200 '
            '1234 range="-" rt=0.001 ua="x"')
    assert services.parse_nginx_log(line + "\ngarbage\n") == [("/cvmfs/x/data/ab/cd", 200, 1234)]
    squid = ("1.0 5 127.0.0.1 TCP_MISS/200 1500 GET http://h/cvmfs/x/data/a - "
             "HIER_DIRECT/127.0.0.1 application/octet-stream\n"
             "1.1 1 127.0.0.1 TCP_MEM_HIT/200 1500 GET http://h/cvmfs/x/data/a - HIER_NONE/- -\n"
             "1.2 1 127.0.0.1 TCP_MISS/200 1500 GET http://h/cvmfs/x/data/a - HIER_NONE/- -\n"
             "1.3 0 127.0.0.1 NONE_NONE/000 0 - error:x - HIER_NONE/- -\n")
    records = services.parse_squid_log(squid)
    assert [r.hit for r in records] == [False, True, False]
    # the benchmark's hit ratio: a collapsed miss cost no origin request, so it counts
    assert [r.answered_locally for r in records] == [False, True, True]


@pytest.mark.service
def test_nginx_counts_requests(bench_env: BenchEnvironment,
                               need_service: Callable[[str], None]) -> None:
    need_service("nginx")
    with services.Nginx(bench_env.srv) as nginx:
        assert nginx.counters() == services.OriginCounters(0, 0)
        http = urllib3.PoolManager()
        body = http.request("GET", f"{nginx.url}/cvmfs/{FQRN}/.cvmfspublished").data
        assert http.request("GET", f"{nginx.url}/etc/passwd").status == 404
        counted = nginx.counters()
        assert counted.requests == 2 and counted.bytes >= len(body)


@pytest.mark.service
def test_concurrent_clients_share_one_squid(bench_env: BenchEnvironment,
                                            need_service: Callable[[str], None]) -> None:
    need_service("nginx")
    need_service("squid")
    model = bench_env.models["llm-4m"]
    one = run_concurrency(bench_env, model, 1, timeout=120)
    two = run_concurrency(bench_env, model, 2, timeout=120)
    assert one["ok"] and two["ok"], (one["errors"], two["errors"])
    assert len(two["wall_s"]) == 2 and two["wall_s_max"] >= two["wall_s_median"] > 0
    # the second client is served by Squid: the origin sends the model about once
    assert two["origin_bytes"] < 1.3 * one["origin_bytes"]
    assert two["proxy_bytes"] >= 1.8 * one["proxy_bytes"]
    assert one["hit_ratio"] == 0.0 and two["hit_ratio"] >= 0.4
