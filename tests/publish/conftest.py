"""Fixtures for publisher tests: fresh repositories with small chunk sizes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import Publisher, create_repository
from repos import SMALL_CHUNKS


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Publisher]:
    """``make_repo(fqrn="t.test", **settings)`` -> a Publisher of a new repository."""
    counter = iter(range(1000))

    def make(fqrn: str = "t.test", **changes: object) -> Publisher:
        root = tmp_path / f"r{next(counter)}" / "srv"
        return create_repository(root, fqrn, settings=SMALL_CHUNKS.with_(**changes))

    return make


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create files (``bytes``) and symlinks (``str`` starting with ``->``) below ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("->"):
            os.symlink(content[2:], path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root
