"""Reader commands take a URL, a folder or a FQRN (``--config``), follow aliases, and browse
through the site's Squid (``CVMFS_HTTP_PROXY``), as a user runs them (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.testing import Nginx, Squid

pytestmark = pytest.mark.service

FQRN = "browse.test"


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *map(str, args)],
        capture_output=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """(served root, master key, the model's weights); hep/tagger:1 with alias ``prod``."""
    base = tmp_path_factory.mktemp("browse")
    src = base / "model"
    src.mkdir()
    weights = os.urandom(200_000)
    (src / "tagger.bin").write_bytes(weights)
    publisher = create_repository(base / "srv" / "cvmfs", FQRN, settings=PublishSettings(workers=2))
    publish_model(publisher, src, ModelRef.parse("hep/tagger:1"), aliases=("latest", "prod"))
    return base / "srv", publisher.keys.paths.master_public, weights


def test_fqrn_with_config_through_squid(
    published: tuple[Path, Path, bytes],
    nginx_factory: Callable[..., Nginx],
    squid_factory: Callable[..., Squid],
    tmp_path: Path,
) -> None:
    root, key, weights = published
    origin = nginx_factory(root)
    squid = squid_factory()
    config = tmp_path / "site.conf"
    config.write_text(f"CVMFS_SERVER_URL={origin.repo_url(FQRN)}\nCVMFS_PUBLIC_KEY={key}\n")
    env = {"CVMFS_HTTP_PROXY": squid.url}  # the site's proxy, from the environment

    cat = cli("repo", "cat", FQRN, "/hep/tagger/prod/tagger.bin", "--config", config, env=env)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == weights
    listing = cli("repo", "ls", FQRN, "/hep/tagger/prod", "--json", "--config", config, env=env)
    assert listing.returncode == 0, listing.stderr
    assert {e["path"] for e in json.loads(listing.stdout)} >= {"/hep/tagger/1/tagger.bin"}
    models = cli("model", "ls", FQRN, "--json", "--config", config, env=env)
    assert models.returncode == 0, models.stderr
    rows = json.loads(models.stdout)
    assert [(r["ref"], sorted(r["aliases"])) for r in rows] == [
        ("hep/tagger:1", ["latest", "prod"])
    ]
    info = cli("model", "info", FQRN, "hep/tagger:prod", "--json", "--config", config, env=env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["path"] == "/hep/tagger/1"

    # every request went through Squid: the origin saw only what Squid forwarded (both logs
    # complete: records() and requests_so_far() wait for every request answered so far)
    through = squid.records()
    assert through and all(FQRN in r.url for r in through)
    assert any(r.url.endswith("/.cvmfspublished") for r in through)
    forwarded = [r for r in through if r.contacted_upstream]
    assert len(origin.requests_so_far()) == len(forwarded)


def test_url_and_folder_and_clear_errors(
    published: tuple[Path, Path, bytes], nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    root, key, weights = published
    origin = nginx_factory(root)
    by_url = cli("repo", "cat", origin.repo_url(FQRN), "/hep/tagger/prod/tagger.bin", "--key", key)
    assert by_url.returncode == 0 and by_url.stdout == weights, by_url.stderr
    folder = root / "cvmfs" / FQRN
    by_folder = cli("model", "info", folder, "hep/tagger:prod", "--json")  # key from repo create
    assert by_folder.returncode == 0, by_folder.stderr
    assert json.loads(by_folder.stdout)["version"] == "1"
    stat = cli("repo", "stat", folder, "/hep/tagger/prod/tagger.bin")
    assert json.loads(stat.stdout)["size"] == len(weights)

    unknown = cli("repo", "ls", "nowhere.test", env={"CVMFS_ML_CONFIG": ""})
    assert unknown.returncode == 1
    lines = unknown.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "CVMFS_SERVER_URL" in lines[0], lines
    escape = cli("repo", "cat", folder, "/hep/tagger/1/../../../../etc/passwd")
    assert escape.returncode == 1 and len(escape.stderr.decode().strip().splitlines()) == 1
