"""The configuration file: values that cannot work are refused with one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.registry.config import load_config

# Each was taken: 0 batch_max_jobs claimed no job ever (every CID queued for good), a negative
# max_days made the daily cleanup remove every CID, a negative max_upload_bytes refused every
# upload as too large, a prefix with '..' put CIDs outside /sw, NaN compared false everywhere.
BAD: list[tuple[str, Any]] = [
    ("batch_max_jobs", 0),
    ("batch_max_jobs", -1),
    ("batch_max_bytes", 0),
    ("max_upload_bytes", -1),
    ("max_unpacked_bytes", 0),
    ("max_tar_members", 0),
    ("max_tar_catalogs", -1),
    ("max_tags_per_push", 0),
    ("max_days", -1),
    ("max_days", 0),
    ("max_days", float("nan")),
    ("uploads_per_minute", -5),
    ("upload_low_speed_limit", -1),
    ("upload_low_speed_seconds", float("inf")),
    ("cleanup_hour", 24),
    ("cleanup_hour", -2),
    ("prefix", ""),
    ("prefix", "../etc"),
    ("prefix", "sw/../.."),
    ("prefix", "/sw"),
]


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_values_that_cannot_work_are_refused(tmp_path: Path, key: str, value: Any) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError, match=key):
        load_config(path)
    result = CliRunner().invoke(app, ["registry", "token", "list", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and key in result.stderr, result.stderr


def test_values_at_the_edges_are_taken(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    edges = {"max_tar_catalogs": 0, "uploads_per_minute": 0, "upload_low_speed_limit": 0,
             "upload_low_speed_seconds": 0, "cleanup_hour": -1, "max_days": 0.5,
             "prefix": "sw/v1.x_y-z"}  # fmt: skip
    path.write_text(json.dumps(edges))
    config = load_config(path)
    assert {key: getattr(config, key) for key in edges} == edges
    path.write_text(json.dumps({"cleanup_hour": 23, "batch_max_jobs": 1}))
    assert load_config(path).cleanup_hour == 23


def test_token_list_of_a_missing_file_says_so(tmp_path: Path) -> None:
    """``registry token list --config TYPO.json`` printed nothing and exited 0, as if the
    registry had no tokens; now one line names the file and exit 1."""
    missing = tmp_path / "registy.json"
    result = CliRunner().invoke(app, ["registry", "token", "list", "--config", str(missing)])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(missing) in result.stderr and "token add" in result.stderr, result.stderr
    assert not missing.exists()
