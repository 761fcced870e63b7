"""A published model repository served over HTTP on loopback, and FUSE mounts of it.

``site`` publishes two versions of a small ONNX MLP (``hep/mlp:1.0`` and ``2.0``, alias ``prod``
on 1.0), serves the repository with the real HTTP server, and writes a client configuration
(upstream's ``CVMFS_*`` words) that names the server, the key and a cache; ``mount_site`` mounts
it at ``<mounts>/<fqrn>`` so that ``CVMFS_MOUNT_DIR=<mounts>`` makes it "the" mount.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.bench.generators import make_mlp_onnx
from cvmfs_ml.client.fuse import MountHandle, is_mounted, mount
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer
from fusecheck import fuse_problem

FQRN = "models.test.org"
HIDDEN = 32


def onnx_output(folder: Path, name: str = "model.onnx") -> np.ndarray:
    """onnxruntime's output of ``folder/name`` on a fixed input."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
    x = np.linspace(-1, 1, 2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
    return session.run(None, {"x": x})[0]


@dataclass
class Site:
    publisher: Publisher
    server: RepositoryServer
    config: Path
    mounts: Path
    originals: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment a job would have: our configuration and mount root, nothing else."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS")}
        return {**keep, "CVMFS_ML_CONFIG": str(self.config), "CVMFS_MOUNT_DIR": str(self.mounts)}

    def publish(self, version: str, seed: int, aliases: tuple[str, ...] = ()) -> None:
        folder = self.publisher.repo_dir.parent.parent / "src" / version
        make_mlp_onnx(folder / "model.onnx", hidden=HIDDEN, layers=2, seed=seed)
        (folder / "labels.txt").write_text(f"version {version}\n")
        ref = ModelRef("hep", "mlp", version)
        publish_model(self.publisher, folder, ref, aliases=("latest", *aliases))
        self.originals[version] = folder


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = PublishSettings(compression=Compression.ZLIB, workers=2)
    publisher = create_repository(tmp_path / "srv", FQRN, settings=settings)
    server = RepositoryServer(tmp_path / "srv").start()
    config = tmp_path / "client.conf"
    config.write_text(
        f"CVMFS_SERVER_URL={server.url}/cvmfs/@fqrn@\nCVMFS_HTTP_PROXY=DIRECT\n"
        f"CVMFS_PUBLIC_KEY={publisher.keys.paths.master_public}\n"
        f"CVMFS_CACHE_BASE={tmp_path / 'cache'}\nCVMFS_TIMEOUT=5\nCVMFS_MAX_RETRIES=0\n"
    )
    mounts = tmp_path / "cvmfs"
    mounts.mkdir()
    made = Site(publisher, server, config, mounts)
    made.publish("1.0", seed=1, aliases=("prod",))
    made.publish("2.0", seed=2)
    try:
        yield made
    finally:
        server.stop()


@pytest.fixture
def mount_site(site: Site, tmp_path: Path) -> Iterator[Callable[[], MountHandle]]:
    """``mount_site()`` mounts the site's repository at ``site.mounts/<fqrn>``; unmounted after."""
    problem = fuse_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE tests cannot run: {problem}; CI must provide FUSE")
        pytest.skip(f"FUSE tests skipped: {problem}")
    handles: list[MountHandle] = []

    def start() -> MountHandle:
        point = site.mounts / FQRN
        point.mkdir(exist_ok=True)
        handle = mount(FQRN, point, config_files=[site.config], cache=tmp_path / "mount-cache",
                       log_file=tmp_path / "fuse.log", timeout=60.0)  # fmt: skip
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        try:
            handle.unmount(timeout=15)
        finally:
            if is_mounted(handle.mountpoint):
                subprocess.run(["fusermount3", "-uz", str(handle.mountpoint)], check=False)
