"""The web page's listing with more versions than it shows, and with a version whose
``model.json`` does not read: the search covers every version, and one bad document hides
nothing but itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import ModelBatch, _published, prepare_version
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.registry import web

FQRN = "listing.test"


@pytest.fixture
def service(tmp_path: Path) -> Any:
    """Eight versions published in one revision, the first one's model.json then broken; the
    part of a registry service the page reads."""
    publisher = create_repository(tmp_path / "srv", FQRN, settings=PublishSettings(workers=1))
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w" * 100)
    with publisher.transaction() as txn, _published(publisher) as repo:
        batch = ModelBatch(txn, repo)
        for i in range(8):
            batch.add_version(prepare_version(source, ModelRef("ns", f"m{i}", "1")))
        batch.finish()
        txn.commit()
    with publisher.transaction() as txn:
        txn.add_bytes(ModelRef("ns", "m0", "1").model_json_path, b'{"schema": ')
        txn.commit()
    worker = SimpleNamespace(publisher=Publisher.open(publisher.repo_dir))
    return SimpleNamespace(workers={FQRN: worker}, repositories=[FQRN], data_dir=tmp_path)


def test_search_covers_versions_past_the_listing_limit(
    service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model.json was read and the first MAX_LISTED kept before the search ran: m7 of 8
    with a limit of 5 was never found (700 versions: 0.9-2 s a view, the 701st unfindable)."""
    monkeypatch.setattr(web, "MAX_LISTED", 5)
    fqrn, records, matched = web.model_rows(service, "M7")
    assert fqrn == FQRN and matched == 1
    assert [str(r.ref) for r in records] == ["ns/m7:1"] and records[0].files  # the full record
    _, shown, matched = web.model_rows(service)
    assert matched == 8 and len(shown) == 5


def test_one_unreadable_model_json_hides_only_itself(service: Any) -> None:
    """A FormatError from one model.json emptied the whole list ('0 model version(s)')."""
    _, records, matched = web.model_rows(service)
    assert matched == 8 and [r.ref.name for r in records] == [f"m{i}" for i in range(8)]
    broken = records[0]
    assert broken.files == [] and all(r.files for r in records[1:])  # m0: its index summary
