"""``cvmfs-ml wait CID --repo URL --repo URL``: polls the repositories over HTTP, as a job would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.storage.http import RepositoryServer

from ._helpers import FQRNS, RegistryEnv, make_tarball, post, text


def _wait_argv(cid: str, urls: list[str], keys: str, timeout: float) -> list[str]:
    argv = [sys.executable, "-m", "cvmfs_ml.cli", "wait", cid]
    for url in urls:
        argv += ["--repo", url]
    return [*argv, "--key", keys, "--timeout", str(timeout), "--interval", "0.2"]


def test_wait_prints_the_path_once_visible(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    keys = str(registry_env.root.parent / "keys")
    with RepositoryServer(registry_env.root) as web:
        urls = [f"{web.url}/cvmfs/{fqrn}" for fqrn in FQRNS]
        # Started before the publish: it must keep polling until the CID appears.
        waiter = subprocess.Popen(
            _wait_argv("grp/waited", urls, keys, 180),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            body = make_tarball({"hello.txt": b"hello\n"})
            answer = post(server, "/pubapi/publish?cid=grp/waited", body,
                          registry_env.tokens["writer"])  # fmt: skip
            assert text(answer) == "OK\n"
            out, err = waiter.communicate(timeout=240)
        finally:
            waiter.kill()
        assert waiter.returncode == 0, err
        assert out.strip() in {f"/cvmfs/{fqrn}/sw/grp/waited" for fqrn in FQRNS}

        # Never published: exit 1 with one line saying so.
        missing = subprocess.run(
            _wait_argv("grp/never", urls, keys, 1), capture_output=True, text=True, timeout=120
        )
        assert missing.returncode == 1
        assert missing.stderr.startswith("cvmfs-ml: grp/never not visible in ")
        assert len(missing.stderr.strip().splitlines()) == 1
    # An unreachable server: the timeout names the reason, still one line.
    gone = subprocess.run(
        _wait_argv("grp/waited", ["http://127.0.0.1:9/cvmfs/pub1.test"], keys, 1),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gone.returncode == 1 and "127.0.0.1:9" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1


def test_wait_fails_at_once_on_what_waiting_cannot_fix(tmp_path: Path) -> None:
    """A repository name with no configured server, or no key: one line at once, not after
    the (here 600 s) timeout. An unreachable server is still waited for (above)."""
    env = {k: v for k, v in os.environ.items() if k != "CVMFS_ML_CONFIG"} | {"HOME": str(tmp_path)}
    for target in ("no-such-repo.example.org", ""):
        argv = [sys.executable, "-m", "cvmfs_ml.cli", "wait", "grp/x", "--repo", target,
                "--timeout", "600", "--interval", "0.2"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env=env)  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert "not visible" not in done.stderr and "is not a URL" in done.stderr


def test_wait_refuses_an_interval_it_cannot_sleep(registry_env: RegistryEnv) -> None:
    """``--interval inf`` (or 1e308) passed the check and ended in a traceback
    (``OverflowError: timestamp out of range``) at the first sleep; ``--timeout inf`` (wait
    for ever) stays allowed."""
    from cvmfs_ml.errors import ConfigError
    from cvmfs_ml.registry.wait import wait_for_cid

    for interval in ("inf", "1e308"):
        argv = [sys.executable, "-m", "cvmfs_ml.cli", "wait", "grp/x", "--repo",
                str(registry_env.repos[0]),
                "--timeout", "1e308", "--interval", interval]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("cvmfs-ml: --interval"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    missing = str(registry_env.root / "missing")
    with pytest.raises(ConfigError, match="not a URL"):  # past the check: the folder is no repo
        wait_for_cid("grp/x", [missing], timeout=float("inf"), interval=1)
