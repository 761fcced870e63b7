"""How much one OCI image or artifact may take: what its manifest declares, what its layers
unpack to, and its config blob.

A registry is not trusted. The compressed size its manifest declares for the layers is checked
before anything is downloaded (:func:`check_declared`), and each blob is then held to its declared
size as it streams in. That alone does not bound the disk: a 4 MiB gzip layer of zeros unpacks to
4 GiB. So what the layers of one image or model version write is counted as it is written
(:class:`UnpackBudget`, spent by :class:`~cvmfs_ml.models.sources.unpack.TreeWriter`) and held to
a limit: by default :data:`UNPACK_RATIO` times the declared size, at least :data:`UNPACK_FLOOR`
(real layers compress 2 to 10 times), or the absolute limit an operator sets
(``--max-unpacked-bytes`` of ``cvmfs-ml sync`` and ``cvmfs-ml model ingest``).

Bytes do not bound the entries: a 70 MB gzip layer holds ten million empty files, which cost no
bytes but an inode in scratch space each and about 1 KB of publisher memory each until the
catalog is written. So the tar members of one image or artifact are counted too and held to
:data:`MAX_MEMBERS` (``--max-members`` of ``cvmfs-ml sync``), as the registry holds a user's
tarball to ``max_tar_members``.

Nor do bytes bound the nested catalogs: each ``.cvmfscatalog`` file in a layer makes its folder a
nested catalog when published, a catalog object that every client reading below it fetches and
a connection, a commit and a signature-chain entry for the publisher (3000 took 12 s to
publish). Upstream puts no limit on them, but an image or model from outside has no reason to
carry more than a few, so their markers are held to :data:`MAX_CATALOGS` (``--max-catalogs`` of
``cvmfs-ml sync``, ``max_tar_catalogs`` of the registry).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cvmfs_ml.errors import FormatError, PublishError

__all__ = [
    "MAX_BYTES",
    "MAX_CATALOGS",
    "MAX_CONFIG_BYTES",
    "MAX_LAYERS",
    "MAX_MEMBERS",
    "UNPACK_FLOOR",
    "UNPACK_RATIO",
    "UnpackBudget",
    "check_declared",
    "check_image_layers",
    "declared_bytes",
]

MAX_BYTES = 256 * 2**30  # declared (compressed) bytes of the layers of one image or version
MAX_CONFIG_BYTES = 4 * 2**20  # an image config is a few kB of JSON
UNPACK_RATIO = 20
UNPACK_FLOOR = 2**30
MAX_MEMBERS = 2_000_000  # tar members of one image or version; large real images have ~500,000
MAX_CATALOGS = 1000  # nested-catalog markers (.cvmfscatalog files) of one image or version
MAX_LAYERS = 1000  # layers of one container image (Docker runs at most 127)


def declared_bytes(layers: Iterable[Any]) -> int:
    """The sizes the layer descriptors declare, summed (checked to be integers by
    :func:`~cvmfs_ml.models.sources.oci_manifest.check_manifest`)."""
    return sum(int(layer.get("size") or 0) for layer in layers if isinstance(layer, dict))


def check_declared(resolved: Any, max_bytes: int) -> int:
    """Refuse, before any download, a manifest declaring more than ``max_bytes`` of layers;
    returns the declared bytes."""
    declared = declared_bytes(resolved.layers)
    if declared > max_bytes:
        raise PublishError(
            f"{resolved.reference} declares {declared} bytes of layers, more than the limit"
            f" of {max_bytes} (--max-bytes)"
        )
    return declared


def check_image_layers(resolved: Any) -> None:
    """Refuse, before any download, a container image of more than :data:`MAX_LAYERS` layers
    (a 16 MiB manifest holds some 80,000: a download, a blob file and an unpacking each)."""
    count = len(resolved.layers)
    if count > MAX_LAYERS:
        raise PublishError(
            f"{resolved.reference} has {count} layers, more than the limit of {MAX_LAYERS}"
            " (Docker runs at most 127)"
        )


@dataclass
class UnpackBudget:
    """The bytes of file content, and the tar members, the layers of one image or artifact may
    still write."""

    limit: int
    rule: str  # where the limit comes from, for the error
    used: int = 0
    max_members: int = MAX_MEMBERS
    members: int = 0
    max_catalogs: int = MAX_CATALOGS
    catalogs: int = 0

    @classmethod
    def for_layers(
        cls,
        layers: Iterable[Any],
        max_unpacked: int | None = None,
        max_members: int = MAX_MEMBERS,
        max_catalogs: int = MAX_CATALOGS,
    ) -> UnpackBudget:
        """``max_unpacked`` if set, else :data:`UNPACK_RATIO` times what ``layers`` declare,
        at least :data:`UNPACK_FLOOR`; at most ``max_members`` tar members, of which at most
        ``max_catalogs`` nested-catalog markers."""
        if max_unpacked is not None:
            return cls(max_unpacked, "set by --max-unpacked-bytes", max_members=max_members,
                       max_catalogs=max_catalogs)  # fmt: skip
        declared = declared_bytes(layers)
        return cls(
            max(UNPACK_FLOOR, UNPACK_RATIO * declared),
            f"{UNPACK_RATIO} times the {declared} bytes the manifest declares, at least"
            f" {UNPACK_FLOOR}; --max-unpacked-bytes sets another",
            max_members=max_members,
            max_catalogs=max_catalogs,
        )

    def count(self, what: str, member: str, *, marker: bool = False) -> None:
        """Count one more tar member of layer ``what`` (``marker``: a ``.cvmfscatalog`` file);
        FormatError past ``max_members`` members or ``max_catalogs`` markers."""
        self.members += 1
        if self.members > self.max_members:
            raise FormatError(
                what,
                f"more than {self.max_members} tar members counting the layers before it (at"
                f" {member!r}), the limit for one image or artifact (--max-members)",
            )
        self.catalogs += marker
        if self.catalogs > self.max_catalogs:
            raise FormatError(
                what,
                f"more than {self.max_catalogs} .cvmfscatalog files (nested catalogs) counting"
                f" the layers before it (at {member!r}), the limit for one image or artifact"
                " (--max-catalogs)",
            )

    def spend(self, size: int, what: str, member: str) -> None:
        """Count ``size`` more bytes written for ``member`` of layer ``what``; FormatError
        once the total passes the limit (the caller throws the whole tree away)."""
        self.used += size
        if self.used > self.limit:
            raise FormatError(
                what,
                f"unpacks to more than {self.limit} bytes (at {member!r}), the limit for one"
                f" image or artifact ({self.rule})",
            )
