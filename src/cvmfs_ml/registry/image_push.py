"""A container image pushed to ``/v2/`` is published in DUCC's layout, by sync's unpacker.

Model artifacts (ORAS, ModelPack, KitOps) go through the models layer
(:class:`cvmfs_ml.registry.oci_api.ModelPublisher`); an image goes to
:func:`cvmfs_ml.sync.push.publish_image`: ``/.flat/<c[0:2]>/<c>/`` and the public link
``/<registry>/<repository>:<tag>``, exactly where ``cvmfs-ml sync`` would put the same image.

``<registry>`` is ``image_registry`` from the configuration, else the ``Host`` the push came
to (what the pusher named the registry), when it is a plain ``host[:port]``.
"""

from __future__ import annotations

import logging
import re
import sqlite3

from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.models.sources.oci_client import OciReference
from cvmfs_ml.registry.local_client import LocalRegistryClient
from cvmfs_ml.registry.oci_store import OciStore
from cvmfs_ml.registry.service import RegistryService
from cvmfs_ml.sync.push import publish_image

__all__ = ["image_registry_name", "publish_pushed_image"]

log = logging.getLogger("cvmfs_ml.registry")
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(?::[0-9]{1,5})?")


def image_registry_name(configured: str, host: str) -> str:
    """The ``<registry>`` of a pushed image's public link (``localhost`` if nothing fits)."""
    for name in (configured, host):
        if name and _HOST_RE.fullmatch(name) and ".." not in name:
            return name
    return "localhost"


def publish_pushed_image(
    service: RegistryService, store: OciStore, repo: str, tag: str, digest: str, registry: str
) -> None:
    """Publish the pushed image ``repo:tag`` (``digest``) and record the outcome in ``store``."""
    worker = service.workers[service.repositories[0]]
    store.set_publish(repo, tag, digest, "publishing")
    try:
        pushed = publish_image(
            worker.publisher,
            LocalRegistryClient(store),
            OciReference("localhost", repo, tag, digest),
            public_registry=registry,
            max_bytes=service.config.max_unpacked_bytes,
        )
    except (CvmfsMlError, ValueError, OSError, sqlite3.OperationalError) as exc:
        reason = worker.failure_reason(exc)
        log.warning("publishing image %s:%s failed: %s", repo, tag, reason)
        service.metrics.errors.labels("oci_publish").inc()
        store.set_publish(repo, tag, digest, "failed", reason=reason)
        return
    if pushed.changed:
        service.metrics.publishes.labels(worker.fqrn).inc()
    log.info("published image %s:%s at %s in revision %d", repo, tag, pushed.public_path,
             pushed.revision)  # fmt: skip
    store.set_publish(repo, tag, digest, "published", model=pushed.public_path,
                      revision=pushed.revision)  # fmt: skip
