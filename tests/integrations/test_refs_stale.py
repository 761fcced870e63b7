"""A materialised copy is of what the repository holds now, not of what it held once.

A version never changes while it is published, but it can be removed and published again with
other bytes: ``model path`` kept handing out the copy of the old bytes without asking the server.
The copy now records what it was made from; a reachable repository whose version no longer
matches gets it made again, and an unreachable one leaves the complete copy in use (offline
sites keep working), said in one warning line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model, remove_model

from .conftest import FQRN, Site

pytestmark = pytest.mark.service

REF = f"cvmfs://{FQRN}/t/st:1"


def _model_path(site: Site) -> tuple[Path, str]:
    """``cvmfs-ml model path REF --copy``: the folder printed, and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "model", "path", REF, "--copy"],
        env=site.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    return Path(done.stdout.strip()), done.stderr


def _publish(site: Site, folder: Path, text: str) -> None:
    folder.mkdir()
    (folder / "weights.txt").write_text(text)
    publish_model(site.publisher, folder, ModelRef("t", "st", "1"))


def test_a_version_published_again_is_copied_again(site: Site, tmp_path: Path) -> None:
    _publish(site, tmp_path / "a", "A\n")
    first, err = _model_path(site)
    assert (first / "weights.txt").read_text() == "A\n" and err == ""
    again, err = _model_path(site)  # unchanged: the same copy, no warning
    assert again == first and err == ""

    remove_model(site.publisher, ModelRef("t", "st", "1"))
    _publish(site, tmp_path / "b", "B, other bytes\n")
    second, err = _model_path(site)
    assert second == first and err == ""
    assert (second / "weights.txt").read_text() == "B, other bytes\n"
    # nothing left beside the copy (the old one, a staging folder)
    assert sorted(p.name for p in second.parent.iterdir()) == ["1"]

    # The server gone: the complete copy is used, and the line says it was not checked.
    site.server.stop()
    offline, err = _model_path(site)
    assert offline == second and (offline / "weights.txt").read_text() == "B, other bytes\n"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: warning: "), err
    assert "could not check" in lines[0] and str(second) in lines[0], err


def test_a_repository_that_fails_its_checks_is_not_taken_for_offline(
    site: Site, tmp_path: Path
) -> None:
    """Only a repository that cannot be reached leaves the copy in use: one whose signature
    does not verify (another key, a tampered server) is an error, not a warning."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    _publish(site, tmp_path / "a", "A\n")
    first, _ = _model_path(site)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = other.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    (tmp_path / "other.pub").write_bytes(pem)
    text = site.config.read_text()
    site.config.write_text(text.replace(str(site.publisher.keys.paths.master_public),
                                        str(tmp_path / "other.pub")))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "model", "path", REF, "--copy"],
        env=site.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not check" not in lines[0], done.stderr
    assert (first / "weights.txt").read_text() == "A\n"  # the copy itself is left as it was


def test_a_link_out_of_the_version_is_copied_again_when_its_target_changes(
    site: Site, tmp_path: Path
) -> None:
    """A link that leads out of the version to a file of the repository is copied as that
    file's bytes; the copy's identity held the link's text only, so once the file was
    published again with other bytes, the copy of the old ones was handed out for ever."""
    _publish(site, tmp_path / "a", "A\n")
    with site.publisher.transaction() as txn:
        txn.mkdir("/shared")
        txn.add_bytes("/shared/w.bin", b"old shared weights\n")
        txn.symlink("/t/st/1/shared.bin", "../../../shared/w.bin")
        txn.commit()
    first, err = _model_path(site)
    assert not (first / "shared.bin").is_symlink() and err == ""
    assert (first / "shared.bin").read_bytes() == b"old shared weights\n"

    with site.publisher.transaction() as txn:
        txn.add_bytes("/shared/w.bin", b"new shared weights\n")
        txn.commit()
    second, err = _model_path(site)
    assert second == first and err == ""
    assert (second / "shared.bin").read_bytes() == b"new shared weights\n"
    assert (second / "weights.txt").read_text() == "A\n"
