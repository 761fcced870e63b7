"""Debian's ``docker-registry`` (distribution 2.x) on loopback: plain HTTP, filesystem storage."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from cvmfs_ml.testing.service import LOOPBACK, Service

__all__ = ["DockerRegistry", "NotifyingDockerRegistry", "registry_config"]


def registry_config(*, addr: str, storage: Path) -> str:
    """A docker-registry (distribution 2.x) configuration: filesystem storage, plain HTTP."""
    return f"""\
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: cvmfs-ml-test-only-{uuid.uuid4().hex}
health:
  storagedriver:
    enabled: false
"""



class DockerRegistry(Service):
    """Debian's ``docker-registry`` (distribution 2.x): plain HTTP, filesystem storage.

    ``url`` is the registry's base URL; ``GET {url}/v2/`` answers 200 when it is up. Images are
    stored under ``storage``.
    """

    binary = "docker-registry"

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        super().__init__(port=port, workdir=workdir)

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"{LOOPBACK}:{self.port}"

    def _prepare(self) -> None:
        self.storage.mkdir(exist_ok=True)
        self.conf_path.write_text(registry_config(addr=self.host, storage=self.storage))

    def _command(self) -> Sequence[str]:
        return [self.binary_path, "serve", str(self.conf_path)]



class NotifyingDockerRegistry(DockerRegistry):
    """docker-registry with ``notifications`` sent to ``webhook`` (distribution's config.yml
    ``notifications.endpoints``), each request carrying ``Authorization: Bearer <token>``."""

    def __init__(
        self, webhook: str, token: str, port: int | None = None, workdir: Path | None = None
    ) -> None:
        self.webhook, self.token = webhook, token
        super().__init__(port=port, workdir=workdir)

    def _prepare(self) -> None:
        super()._prepare()
        endpoint = (
            "notifications:\n  endpoints:\n    - name: cvmfs-ml-sync\n"
            f"      url: {self.webhook}\n      headers:\n"
            f"        Authorization: [Bearer {self.token}]\n"
            "      timeout: 2s\n      threshold: 3\n      backoff: 200ms\n"
        )
        self.conf_path.write_text(self.conf_path.read_text() + endpoint)
