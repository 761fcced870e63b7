"""Shared pytest fixtures for the whole test suite.

The upstream-written reference repository (``shared/fixtures/cvmfs-reference-repo`` beside the
checkout) is the ground truth for format tests. ``CVMFS_ML_REFERENCE_REPO`` overrides its location
so the suite also runs from an installed copy or a CI workspace with a different layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_REFERENCE_REPO = (
    Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "cvmfs-reference-repo"
)

REFERENCE_REPO = Path(os.environ.get("CVMFS_ML_REFERENCE_REPO", _DEFAULT_REFERENCE_REPO))
"""Root of the reference fixture: ``README.md``, ``keys/`` and ``cvmfs/ref.test.local/``."""

REFERENCE_FQRN = "ref.test.local"


@pytest.fixture(scope="session")
def reference_repo() -> Path:
    """The reference fixture root; tests that need it skip when it is not present."""
    if not (REFERENCE_REPO / "cvmfs" / REFERENCE_FQRN / ".cvmfspublished").is_file():
        pytest.skip(f"reference repository not found at {REFERENCE_REPO}")
    return REFERENCE_REPO


@pytest.fixture(scope="session")
def reference_served(reference_repo: Path) -> Path:
    """The served directory of the reference repository (``.../cvmfs/ref.test.local``)."""
    return reference_repo / "cvmfs" / REFERENCE_FQRN
