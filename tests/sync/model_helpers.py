"""Helpers of the model sync tests (test_sync_models.py, test_sync_loop.py): pushing ORAS
artifacts with the oras package and small images with skopeo, writing wishlists, and reading a
published model's files back; and one HTTP pool for the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import urllib3

from cvmfs_ml.publish.repository import Publisher
from sync.imagebuild import FQRN, make_layer, published, push_layout, sha256, write_oci_layout

HTTP = urllib3.PoolManager()


def oras_push(host: str, target: str, files: dict[str, bytes], work: Path) -> None:
    """Push ``files`` as an ORAS artifact with the oras package, as users do."""
    import oras.client

    work.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    previous = os.getcwd()
    os.chdir(work)  # oras-py wants paths below the working directory
    try:
        oras.client.OrasClient(insecure=True).push(target=f"{host}/{target}", files=list(files))
    finally:
        os.chdir(previous)


def model_files(publisher: Publisher, path: str) -> dict[str, str]:
    with published(publisher) as repo:
        return {
            e.path[len(path) + 1 :]: sha256(repo.read_bytes(e.path))
            for e in repo.walk(path)
            if e.is_regular and e.name not in ("model.json", ".cvmfscatalog")
        }


def push_small_image(host: str, tmp_path: Path, repository: str, tag: str) -> None:
    layout = tmp_path / f"layout-{tag}"
    layer = make_layer([("etc", None), ("etc/os", b"test\n"), ("etc/tag", tag.encode())])
    write_oci_layout(layout, [(layer, "gzip")], tag)
    push_layout(layout, tag, host, repository)


def write_wishlist(path: Path, host: str, *, images: list[str], models: str) -> Path:
    inputs = "".join(f"  - 'http://{host}/{image}'\n" for image in images)
    path.write_text(f"version: 1\nuser: cvmfs\ncvmfs_repo: {FQRN}\ninput:\n{inputs}{models}")
    return path
