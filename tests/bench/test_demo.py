"""The README's main job runs end to end and its outputs are sane."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cvmfs_ml.bench.demo import run_demo


@pytest.mark.service
def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", llm_bytes=8 * 2**20, log=lambda _m: None)
    modes = {(r.model, r.mode, r.cache) for r in result.rows}
    for model in ("mlp", "llm"):
        assert (model, "local disk", "cold") in modes
        assert (model, "cvmfs-ml fsspec (download)", "cold") in modes
        if os.path.exists("/dev/fuse") or os.environ.get("CI"):
            assert (model, "cvmfs-ml FUSE", "cold") in modes, result.skipped
            assert (model, "cvmfs-ml FUSE", "hot") in modes
    assert all(r.identical_output for r in result.rows)
    assert all(r.open_s > 0 for r in result.rows)
    fsspec_llm = next(r for r in result.rows if r.model == "llm" and "fsspec" in r.mode)
    assert fsspec_llm.bytes_from_network >= 8 * 2**20
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["url"].endswith("/cvmfs/demo.cvmfs-ml.local") and len(saved["rows"]) == len(
        result.rows
    )
