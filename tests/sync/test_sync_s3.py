"""``cvmfs-ml sync --repo s3://BUCKET/FQRN``: a Stratum 0 in S3 fed from a registry.

``docs/cli.md`` lets every ``REPO`` be ``s3://BUCKET[/PREFIX]/FQRN`` with ``--s3-config FILE``,
but ``sync`` took its ``--repo`` as a local path (``s3:/bkt/...``: "no repository here") and had
no ``--s3-config``: a bucket could not be fed by sync at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.testing import MotoS3
from sync.imagebuild import FQRN
from sync.model_helpers import push_small_image, write_wishlist

pytestmark = pytest.mark.service


def test_sync_feeds_a_stratum0_in_s3(docker_registry: Any, moto_s3: MotoS3, tmp_path: Path) -> None:
    bucket = f"sync-s3-{os.getpid()}"
    moto_s3.create_bucket(bucket)
    params = {**moto_s3.s3_params(bucket), "CVMFS_SPOOL_DIR": str(tmp_path / "spool")}
    config = tmp_path / "s3.conf"
    config.write_text("".join(f"{k}={v}\n" for k, v in params.items()))
    keys = tmp_path / "keys"
    create_repository(f"s3://{bucket}", FQRN, keys_dir=keys, s3_config=params)
    location = f"s3://{bucket}/{FQRN}"

    host = docker_registry.host
    push_small_image(host, tmp_path, "lib/base", "1")
    wishlist = write_wishlist(tmp_path / "wishlist.yaml", host, images=["lib/base:1"], models="")
    args = ["sync", str(wishlist), "--repo", location, "--keys", str(keys)]
    result = CliRunner().invoke(app, [*args, "--s3-config", str(config)])
    assert result.exit_code == 0, result.output
    assert "revision 0 -> 1" in result.stdout

    publisher = Publisher.open(location, keys, s3_config=params)
    assert publisher.manifest().revision == 1
    with Repository.open(
        location, public_key=keys / f"{FQRN}.pub", s3_config=params, cache=tmp_path / "cache"
    ) as repo:
        link = repo.readlink(f"/{host}/lib/base:1")
        assert repo.read_bytes(f"/{host}/lib/{link}/etc/os") == b"test\n"

    again = CliRunner().invoke(app, [*args, "--s3-config", str(config)])  # nothing changed
    assert again.exit_code == 0, again.output
    assert "no new revision (still 1)" in again.stdout
    assert publisher.manifest().revision == 1
