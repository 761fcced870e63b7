"""A round's scratch folder, and the removal of those that killed rounds left (a sync round's,
or an image push's: :mod:`cvmfs_ml.sync.push`).

Each round unpacks into ``cvmfs-ml-sync.<random>/`` under ``--scratch`` (or ``TMPDIR``) and
removes it as it ends; the folder is held with a lock for the round's life, so that the next
round removes what a killed one left (:mod:`cvmfs_ml.storage.held`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cvmfs_ml.storage.held import held_folder

__all__ = ["round_scratch"]

PREFIX = "cvmfs-ml-sync."


@contextlib.contextmanager
def round_scratch(scratch: Path | None) -> Iterator[Path]:
    """A new folder for one round under ``scratch`` (default: the system's temporary folder),
    removed as the round ends; what killed rounds left there goes first."""
    parent = Path(scratch if scratch is not None else tempfile.gettempdir())
    with held_folder(parent, PREFIX) as folder:
        yield folder
