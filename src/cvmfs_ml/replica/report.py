"""What one snapshot of ``cvmfs-ml replica sync`` did (:func:`.sync.sync_replica`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SyncReport"]


@dataclass
class SyncReport:
    """What one snapshot did. ``previous_revision`` is the replica's before it (None: new)."""

    fqrn: str
    upstream: str
    revision: int
    root_catalog: str
    previous_revision: int | None
    catalogs_copied: int = 0
    catalogs_present: int = 0
    objects_copied: int = 0
    objects_present: int = 0
    bytes_copied: int = 0
    tags: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # historic catalogs a GC'd source lacks
    manifest_changed: bool = True
    reflog_rebuilt: bool = False  # the replica's own .cvmfsreflog did not open
    seconds: float = 0.0

    @property
    def up_to_date(self) -> bool:
        """True when the replica already had everything (nothing but the whitelist may change)."""
        return not self.manifest_changed and self.objects_copied == 0 and not self.catalogs_copied

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "up_to_date": self.up_to_date}
