"""``kserve-init`` copying a folder whose symlinks lead out of it (no mount: a verified copy).

The whole initializer used to fail on the first link that left the folder for a path outside
the repository (``/etc/shadow``, a link to nothing), and kept a link that only *looked* inside
(``sub/back/../x`` where ``sub/back -> ..``) as it was, so that the copy read a file of the
initializer's own disk beside the destination. Now a link is kept when the destination follows
it to something inside the copy, becomes the file's bytes when it leads to a regular file of the
repository elsewhere, and is kept as it is with one warning line otherwise; nothing outside the
repository is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from .conftest import FQRN, Site, onnx_output
from .test_kserve_init import init

pytestmark = pytest.mark.service

CONFIG = b'{"hidden": 32}\n'
SHARED = b"weights shared with another model\n" * 100
LOCAL_SECRET = b"a file of the initializer's own disk\n"


def publish_linked_folder(site: Site) -> None:
    """``/plain/model`` with links of every kind, beside ``/plain/shared*``."""
    with site.publisher.transaction() as txn:
        for folder in ("/plain", "/plain/model", "/plain/model/sub", "/plain/shared"):
            txn.mkdir(folder)
        txn.add_bytes("/plain/shared.bin", SHARED)
        txn.add_bytes("/plain/shared/x.txt", b"x\n")
        txn.add_bytes("/plain/model/config.json", CONFIG)
        links = {
            "alias.json": "config.json",  # inside: kept
            "sub/up.json": "../config.json",  # inside through '..': kept
            "sub/back": "..",  # the folder itself: kept
            "model.onnx": "../../hep/mlp/1.0/model.onnx",  # a file elsewhere: its bytes
            "abs.bin": f"/cvmfs/{FQRN}/plain/shared.bin",  # the same, absolute
            "trick.bin": "sub/back/../shared.bin",  # looks inside, leads to /plain/shared.bin
            "shadow": "/etc/shadow",  # out of the repository: kept, warned, never read
            "folder": "../shared",  # a folder elsewhere: kept, warned, not copied whole
            "nothing": "missing.bin",  # to nothing: kept, warned
        }
        for name, target in links.items():
            txn.symlink(f"/plain/model/{name}", target)
        txn.commit()


def test_links_out_of_the_folder_neither_fail_nor_read_local_files(
    site: Site, tmp_path: Path
) -> None:
    publish_linked_folder(site)
    # Where a link kept as it looked would lead from the destination: a local file.
    (tmp_path / "shared.bin").write_bytes(LOCAL_SECRET)
    dest = tmp_path / "models"
    log = init(site, f"cvmfs://{FQRN}/plain/model", dest)

    assert (dest / "config.json").read_bytes() == CONFIG
    assert os.readlink(dest / "alias.json") == "config.json"
    assert os.readlink(dest / "sub" / "up.json") == "../config.json"
    assert (dest / "sub" / "up.json").read_bytes() == CONFIG
    assert os.readlink(dest / "sub" / "back") == ".."
    # Files elsewhere in the repository: their verified bytes, so the model loads.
    assert not (dest / "model.onnx").is_symlink()
    np.testing.assert_array_equal(onnx_output(dest), onnx_output(site.originals["1.0"]))
    for name in ("abs.bin", "trick.bin"):
        assert not (dest / name).is_symlink(), name
        assert (dest / name).read_bytes() == SHARED, name
    # The rest: the same links, one warning each, nothing read through them.
    assert os.readlink(dest / "shadow") == "/etc/shadow"
    assert os.readlink(dest / "folder") == "../shared"
    assert os.readlink(dest / "nothing") == "missing.bin"
    warnings = [line for line in log.splitlines() if line.startswith("cvmfs-ml: warning: ")]
    assert len(warnings) == 3, log
    for name, why in (("shadow", "the repository"), ("folder", "to a folder"),
                      ("nothing", "leads to nothing")):  # fmt: skip
        assert any(line.startswith(f"cvmfs-ml: warning: {name}: ") and why in line
                   for line in warnings), (name, log)  # fmt: skip
    copied = [p for p in dest.rglob("*") if p.is_file() and not p.is_symlink()]
    assert all(p.read_bytes() != LOCAL_SECRET for p in copied)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging left behind"

