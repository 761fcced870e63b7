"""The probe of what fresh page cache costs on this machine, and its line in the read report."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.bench.fresh_pages import FreshPageCost, measure_fresh_page_cost
from cvmfs_ml.bench.read_report import fresh_page_note


def test_probe_measures_both_passes_and_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "keep").write_bytes(b"x")
    cost = measure_fresh_page_cost(tmp_path, 8 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert cost.probe_bytes == 8 << 20
    assert cost.fresh_s_per_gib > 0 and cost.reused_s_per_gib > 0
    doc = cost.to_json()
    assert doc["charge_s_per_gib"] == round(max(0.0, cost.fresh_s_per_gib
                                                - cost.reused_s_per_gib), 3)
    assert "s CPU/GiB into fresh pages" in cost.describe()


def test_probe_refuses_a_size_of_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        measure_fresh_page_cost(tmp_path, 0)


def test_report_explains_the_charge_only_when_there_is_one() -> None:
    charged = FreshPageCost(1.41, 0.18, 2 << 30, True).to_json()
    flat = FreshPageCost(0.20, 0.18, 2 << 30, False).to_json()
    assert "1.41 s CPU per GiB" in fresh_page_note(charged)
    assert "weighs on the ×curl ratios" in fresh_page_note(charged)
    assert "weighs" not in fresh_page_note(flat)
