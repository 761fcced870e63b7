"""``kserve-init``'s URI DEST pairs: a DEST inside another DEST is refused before any write."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.integrations.kserve import pair_arguments


def test_nested_destinations_are_refused(tmp_path: Path) -> None:
    """Both were accepted: the second model was copied into the first model's folder."""
    uri = "cvmfs://models.test/m/model.bin"
    with pytest.raises(ConfigError, match="is inside DEST"):
        pair_arguments([uri, str(tmp_path / "x"), uri, str(tmp_path / "x" / "y")])
    with pytest.raises(ConfigError, match="is inside DEST"):
        pair_arguments([uri, "/", uri, "/mnt/models"])
    pairs = pair_arguments([uri, str(tmp_path / "x"), uri, str(tmp_path / "xy")])  # siblings
    assert [dest.name for _, dest in pairs] == ["x", "xy"]
