"""What every remote model source shares: the ingest result, and "is this already published?".

Sources (OCI, MLflow) fetch a model into a local folder and hand it to
:func:`cvmfs_ml.models.publish.publish_model`. Before fetching, they ask
:func:`published_record` whether the target version already holds the same upstream content
(same manifest digest, same MLflow model id), so a re-run writes nothing: no download, no
revision, no object. This is DUCC's "manifest as commit marker" idea with the marker kept in
``model.json``'s ``source``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_ml.models.layout import ModelRecord, ModelRef
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.publish.repository import Publisher

__all__ = ["IngestResult", "PulledModel", "published_record", "same_source"]


@dataclass
class PulledModel:
    """A fetched model: the folder to publish and what to say about it in ``model.json``."""

    folder: Path
    source: dict[str, Any]
    description: str = ""
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IngestResult:
    """What an ingest did: the published (or already present) record, and whether it skipped."""

    ref: ModelRef
    record: ModelRecord
    source: dict[str, Any]
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": str(self.ref),
            "path": self.ref.path,
            "skipped": self.skipped,
            "source": self.source,
            "files": self.record.file_count,
            "size": self.record.size,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def published_record(publisher: Publisher, ref: ModelRef) -> ModelRecord | None:
    """The ``model.json`` at ``ref`` (a version) in the publisher's current revision, or None.

    Read through the model publisher's own cache (:mod:`cvmfs_ml.models.reader_cache`): a
    cache of its own went to the temporary folder, where a killed process left it."""
    from cvmfs_ml.models.publish import open_published

    ref.require_version()
    with open_published(publisher) as repo:
        try:
            entry = repo.stat(ref.path)
        except FileNotFoundError:
            return None
        if entry.is_symlink:  # an alias, not a version
            return None
        try:
            return read_record(repo, ref)
        except FileNotFoundError:
            return None


def same_source(record: ModelRecord | None, keys: Mapping[str, Any]) -> bool:
    """True when ``record`` exists and its ``source`` matches every item of ``keys``.

    A missing key and an empty value count as equal; ``keys`` must name something (a non-empty
    value besides ``type``), so an unidentifiable source is never taken as already published.
    """
    if record is None or not any(v for k, v in keys.items() if k != "type"):
        return False
    return all((record.source.get(k) or "") == (v or "") for k, v in keys.items())
