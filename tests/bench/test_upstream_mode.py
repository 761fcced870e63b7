"""The ``upstream`` mode: a private cvmfs2 configuration in upstream's words, or a clear skip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cvmfs_ml.bench.modes import make_mode
from cvmfs_ml.bench.upstream import UpstreamMode, upstream_config, upstream_unavailable
from cvmfs_ml.client.config import load_config

FQRN = "bench.cvmfs-ml.test"


def test_config_reads_back_through_an_upstream_syntax_parser(tmp_path: Path) -> None:
    key = tmp_path / f"{FQRN}.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    text = upstream_config(repo_url=f"http://127.0.0.1:8080/cvmfs/{FQRN}", fqrn=FQRN,
                           public_key=key, cache=tmp_path / "cache", proxy=None)
    conf = tmp_path / "client.conf"
    conf.write_text(text)
    parsed = load_config(FQRN, [conf], env={})
    assert parsed.server_urls == [f"http://127.0.0.1:8080/cvmfs/{FQRN}"]  # via @fqrn@
    assert "@fqrn@" in text
    assert parsed.proxy_groups == [["DIRECT"]]
    assert parsed.public_keys == [key] and parsed.cache_base == tmp_path / "cache"
    assert parsed.shared_cache is False and parsed.quota_limit_mb is None
    proxied = upstream_config(repo_url=f"http://h/cvmfs/{FQRN}", fqrn=FQRN, public_key=key,
                              cache=tmp_path, proxy="http://127.0.0.1:3128")
    conf.write_text(proxied)
    assert load_config(FQRN, [conf], env={}).proxy_groups == [["http://127.0.0.1:3128"]]


def test_mode_is_known_and_says_why_it_cannot_run() -> None:
    mode = make_mode("upstream")
    assert isinstance(mode, UpstreamMode) and mode.path_based
    reason = upstream_unavailable()
    if shutil.which("cvmfs2") is None:
        assert reason is not None and "cvmfs2 is not installed" in reason
    else:
        pytest.skip("cvmfs2 is installed here: the benchmark measures it")
