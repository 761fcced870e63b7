"""``cvmfs-ml sync --scratch DIR``: where image layers are unpacked before they are published.

``sync`` had no way to choose it: every round unpacked into the system's temporary folder, often
a small ``/tmp`` while images are gigabytes. ``--scratch`` names the folder (made if missing);
each round's files go into a folder of their own there, removed when the round ends. A folder
that cannot be written fails the command in one line before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.publish.repository import Publisher
from publish.test_cli_errors import one_line_failure, without_dac_override
from sync.imagebuild import FQRN, published
from sync.model_helpers import push_small_image, write_wishlist


@pytest.mark.service
def test_image_layers_are_unpacked_in_the_scratch_folder(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    host = docker_registry.host
    push_small_image(host, tmp_path, "lib/base", "1")
    wishlist = write_wishlist(tmp_path / "wishlist.yaml", host, images=["lib/base:1"], models="")
    args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir), "--scratch"]
    scratch = tmp_path / "big-disk"
    scratch.mkdir()
    os.utime(scratch, ns=(0, 0))  # a folder made and removed in it moves this
    before = publisher.manifest().revision
    result = CliRunner().invoke(app, [*args, str(scratch)])
    assert result.exit_code == 0, result.output
    assert publisher.manifest().revision == before + 1
    with published(publisher) as repo:
        link = repo.readlink(f"/{host}/lib/base:1")
        assert repo.read_bytes(f"/{host}/lib/{link}/etc/os") == b"test\n"
    assert scratch.stat().st_mtime_ns > 0, "the round's folder was not made there"
    assert list(scratch.iterdir()) == []  # and it is gone

    missing = tmp_path / "new" / "scratch"  # made for the round (which has nothing to do)
    result = CliRunner().invoke(app, [*args, str(missing)])
    assert result.exit_code == 0, result.output
    assert missing.is_dir() and list(missing.iterdir()) == []


def test_a_scratch_folder_that_cannot_be_written_is_one_line(
    publisher: Publisher, tmp_path: Path
) -> None:
    wishlist = tmp_path / "wishlist.yaml"
    wishlist.write_text(f"version: 1\ncvmfs_repo: {FQRN}\ninput: ['http://127.0.0.1:9/a/b:1']\n")
    before = publisher.manifest().revision
    args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir), "--scratch"]

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    one_line_failure(without_dac_override(*args, str(not_a_folder)), "not a folder")

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        result = without_dac_override(*args, str(read_only))
        if result.returncode == 0:
            pytest.skip("dropping CAP_DAC_OVERRIDE had no effect here")
        one_line_failure(result, "--scratch", "cannot write there")
        one_line_failure(without_dac_override(*args, str(read_only / "sub")), "--scratch")
    finally:
        read_only.chmod(0o755)
    assert list(read_only.iterdir()) == []
    assert publisher.manifest().revision == before
