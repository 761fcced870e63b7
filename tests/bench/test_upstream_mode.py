"""The ``upstream`` mode: a private cvmfs2 configuration in upstream's words, or a clear skip."""

from __future__ import annotations

import os
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


STAND_IN = """#!/bin/sh
# A stand-in for upstream's cvmfs2 in this test only: its command line
# (cvmfs2 -o OPTIONS FQRN MOUNTPOINT, returning once mounted), cvmfs-ml behind it.
echo "$@" >> "{argv_log}"
config=""
while [ $# -gt 2 ]; do
  if [ "$1" = "-o" ]; then
    for opt in $(echo "$2" | tr , ' '); do
      case "$opt" in config=*) config="${{opt#config=}}" ;; esac
    done
    shift
  fi
  shift
done
[ -n "$config" ] || {{ echo "cvmfs2 stand-in: no -o config=FILE" >&2; exit 2; }}
exec "{python}" -m cvmfs_ml mount -d --config "$config" "$1" "$2"
"""


@pytest.mark.service
def test_the_mode_runs_end_to_end_behind_a_cvmfs2_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, need_fuse: None
) -> None:
    """No upstream cvmfs2 exists on these machines, so the suite's upstream code path (config
    file in upstream's words, ``cvmfs2 -o config=FILE FQRN MNT``, wait for the mount, cache
    states, unmount, report rows) runs here against a stand-in with cvmfs2's command line and
    cvmfs-ml behind it. It proves the plumbing, not upstream's speed: figures for upstream
    need a machine with the real client."""
    import sys

    from cvmfs_ml.bench.profiles import Profile
    from cvmfs_ml.bench.runner import run_profile
    from cvmfs_ml.bench.zoo import ModelSpec

    if shutil.which("cvmfs2") is not None:
        pytest.skip("a real cvmfs2 is installed: the short profile measures it")
    bindir, argv_log = tmp_path / "bin", tmp_path / "cvmfs2-argv.txt"
    bindir.mkdir()
    stand_in = bindir / "cvmfs2"
    stand_in.write_text(STAND_IN.format(argv_log=argv_log, python=sys.executable))
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert upstream_unavailable() is None
    profile = Profile(name="upstream-stand-in", models=(ModelSpec("mlp", "mlp"),),
                      modes=("local", "upstream"), repeats=1, inference_runs=1, timeout=120)
    work = tmp_path / "work"
    doc = run_profile(profile, tmp_path / "out", workdir=work, log=lambda _m: None)
    assert doc["errors"] == [] and doc["skipped"] == []
    rows = {(m["mode"], m["cache_state"]): m for m in doc["measurements"]}
    assert {k for k in rows if k[0] == "upstream"} == {
        ("upstream", "cold"), ("upstream", "warm"), ("upstream", "hot")}
    assert all(m["ok"] for m in rows.values())
    assert len({m["output_sha256"] for m in rows.values()}) == 1  # same output as local disk
    # cold started from an empty private cache and fetched the model; warm fetched (almost)
    # nothing but the manifest: the cache named in the config file is the one in use
    cold, warm = rows[("upstream", "cold")], rows[("upstream", "warm")]
    assert cold["origin_bytes"] > warm["origin_bytes"]
    assert warm["origin_bytes"] < 64 * 1024
    cache = work / "upstream-loopback" / "cache"
    assert any(p.is_file() for p in cache.rglob("*"))
    calls = argv_log.read_text().splitlines()
    assert len(calls) == 2  # cold mounts, warm remounts (cache kept), hot keeps the mount
    config = work / "upstream-loopback" / "client.conf"
    assert all(line == f"-o config={config} {FQRN} {work / 'upstream-loopback' / 'mnt'}"
               for line in calls)
    assert not os.path.ismount(work / "upstream-loopback" / "mnt")
    assert "upstream@loopback" in doc["settings"]["modes"]
