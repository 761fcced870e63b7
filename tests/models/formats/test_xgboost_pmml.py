"""XGBoost (JSON and UBJSON) and PMML documents.

xgboost is not a dependency: the JSON follows ``doc/json-schema.rst`` and the UBJSON encoder
below mirrors XGBoost's ``UBJWriter`` (``src/common/json.cc``): ``L`` int64 big-endian string
lengths, ``[#L`` counted arrays, ``[$d#L`` / ``[$l#L`` typed arrays, no closing ``]`` after a
count.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect
from cvmfs_ml.models.formats import pmml as pmml_format
from cvmfs_ml.models.formats.base import Source

from ._helpers import CountingFile


def _tree(i: int, nodes: int) -> dict[str, Any]:
    return {
        "base_weights": [0.5] * nodes,
        "categories": [],
        "default_left": [0] * nodes,
        "id": i,
        "left_children": [-1] * nodes,
        "right_children": [-1] * nodes,
        "split_conditions": [1.5] * nodes,
        "split_indices": [0] * nodes,
        "tree_param": {"num_deleted": "0", "num_feature": "3", "num_nodes": str(nodes)},
    }


def _doc(nodes: int = 3) -> dict[str, Any]:
    return {
        "learner": {
            "attributes": {},
            "feature_names": ["f0", "f1", "f2"],
            "feature_types": ["float", "float", "float"],
            "gradient_booster": {
                "model": {
                    "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": "2"},
                    "iteration_indptr": [0, 1, 2],
                    "tree_info": [0, 0],
                    "trees": [_tree(0, nodes), _tree(1, nodes)],
                },
                "name": "gbtree",
            },
            "learner_model_param": {
                "base_score": "5E-1",
                "num_class": "0",
                "num_feature": "3",
                "num_target": "1",
            },
            "objective": {"name": "binary:logistic", "reg_loss_param": {"scale_pos_weight": "1"}},
        },
        "version": [2, 1, 3],
    }


def _ubj(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        if -128 < value < 127:
            return b"i" + struct.pack(">b", value)
        return b"L" + struct.pack(">q", value)
    if isinstance(value, float):
        return b"d" + struct.pack(">f", value)
    if isinstance(value, str):
        raw = value.encode()
        return b"SL" + struct.pack(">q", len(raw)) + raw
    if isinstance(value, dict):
        out = b"{"
        for k in sorted(value):
            raw = k.encode()
            out += b"L" + struct.pack(">q", len(raw)) + raw + _ubj(value[k])
        return out + b"}"
    if isinstance(value, list):
        if value and all(isinstance(v, float) for v in value):
            return b"[$d#L" + struct.pack(">q", len(value)) + struct.pack(f">{len(value)}f", *value)
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return b"[$l#L" + struct.pack(">q", len(value)) + struct.pack(f">{len(value)}i", *value)
        return b"[#L" + struct.pack(">q", len(value)) + b"".join(_ubj(v) for v in value)
    raise TypeError(value)


def _check(desc: Any, nodes: int) -> None:
    assert desc.format == "xgboost" and desc.framework == "xgboost"
    meta = desc.metadata
    assert meta["version"] == "2.1.3"
    assert meta["booster"] == "gbtree"
    assert meta["objective"] == "binary:logistic"
    assert meta["num_trees"] == 2
    assert meta["num_feature"] == 3
    assert meta["num_class"] == 0
    assert meta["num_nodes"] == 2 * nodes
    assert meta["feature_names"] == ["f0", "f1", "f2"]


def test_xgboost_json(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(_doc()))
    assert detect(path) == "xgboost"
    desc = describe(path)
    _check(desc, 3)
    assert desc.metadata["encoding"] == "json"


@pytest.mark.parametrize("nodes", [3, 500])
def test_xgboost_ubj(tmp_path: Path, nodes: int) -> None:
    path = tmp_path / "model.ubj"
    path.write_bytes(_ubj(_doc(nodes)))
    assert detect(path) == "xgboost"
    desc = describe(path)
    _check(desc, nodes)
    assert desc.metadata["encoding"] == "ubj"


def test_other_json_is_not_xgboost(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 8}))
    assert detect(path) is None


def test_truncated_ubj_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.ubj"
    path.write_bytes(_ubj(_doc(100))[:-300])
    assert detect(path) == "xgboost"
    with pytest.raises(ModelFormatError) as info:
        describe(path)
    assert "truncated" in str(info.value) and str(path) in str(info.value)


def test_broken_json_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(_doc())[:-10])
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        describe(path)


_PMML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- exported for tests -->
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header copyright="CERN" description="iris tree">
    <Application name="SkLearn2PMML package" version="0.100.0"/>
    <Timestamp>2024-01-01T00:00:00Z</Timestamp>
  </Header>
  <DataDictionary numberOfFields="3">
    <DataField name="species" optype="categorical" dataType="string"><Value value="a"/></DataField>
    <DataField name="petal_length" optype="continuous" dataType="double"/>
    <DataField name="petal_width" optype="continuous" dataType="float"/>
  </DataDictionary>
  <TreeModel functionName="classification" modelName="iris" algorithmName="rpart">
    <MiningSchema>
      <MiningField name="species" usageType="target"/>
      <MiningField name="petal_length"/>
      <MiningField name="petal_width" usageType="active"/>
    </MiningSchema>
    <Node score="a"><True/></Node>
{filler}  </TreeModel>
</PMML>
"""


def test_pmml_document(tmp_path: Path) -> None:
    path = tmp_path / "iris.xml"
    path.write_text(_PMML.replace("{filler}", ""))
    assert detect(path) == "pmml"
    desc = describe(path)
    assert desc.format == "pmml"
    assert desc.framework == "SkLearn2PMML package"
    meta = desc.metadata
    assert meta["version"] == "4.4"
    assert meta["namespace"] == "http://www.dmg.org/PMML-4_4"
    assert meta["model_type"] == "TreeModel"
    assert meta["function_name"] == "classification"
    assert meta["model_name"] == "iris"
    assert meta["copyright"] == "CERN"
    assert meta["data_fields"] == 3
    assert [(t.name, t.dtype) for t in desc.inputs] == [
        ("petal_length", "double"),
        ("petal_width", "float"),
    ]
    assert [(t.name, t.dtype) for t in desc.outputs] == [("species", "string")]


def test_large_pmml_reads_only_its_start(tmp_path: Path) -> None:
    filler = '    <Node score="b"><True/></Node>\n' * 100_000
    path = tmp_path / "big.pmml"
    path.write_text(_PMML.replace("{filler}", filler))
    assert path.stat().st_size > 3 << 20
    f = CountingFile(path)
    with f:
        desc = pmml_format.describe(f, Source(str(path)))
    assert desc.metadata["model_type"] == "TreeModel"
    assert f.bytes_read <= 1 << 17


def test_other_xml_and_broken_pmml(tmp_path: Path) -> None:
    other = tmp_path / "page.xml"
    other.write_text("<html><body>hi</body></html>")
    assert detect(other) is None
    broken = tmp_path / "broken.pmml"
    broken.write_text('<PMML version="4.4"><Header></Head></PMML>')
    assert detect(broken) == "pmml"
    with pytest.raises(ModelFormatError, match="malformed PMML XML"):
        describe(broken)


def test_entity_expansion_bomb_is_rejected(tmp_path: Path) -> None:
    entities = "".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)
    )
    path = tmp_path / "bomb.pmml"
    path.write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE PMML [<!ENTITY a "aaaaaaaaaa">{entities}]>\n'
        '<PMML version="4.4"><Header description="&i;"/></PMML>'
    )
    with pytest.raises(ModelFormatError, match="malformed PMML XML"):
        describe(path)
