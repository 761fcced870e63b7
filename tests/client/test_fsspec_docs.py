"""docs/fsspec.md works as written: its Python blocks run, in order, as one script, against a
repository published with the engine and served by nginx on loopback.

The doc names ``models.example.org`` through the client configuration (``CVMFS_ML_CONFIG``
here), so most blocks run verbatim; the explicit-options block names a server on
``localhost:8000`` and a key in ``/etc/cvmfs/keys``, and the examples write to ``/tmp/``: those
three strings are replaced with the loopback server, the test's key and the test's folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.testing import Nginx

pytestmark = [pytest.mark.service, pytest.mark.slow]

FQRN = "models.example.org"
DOC = Path(__file__).resolve().parents[2] / "docs" / "fsspec.md"


def doc_script(text: str) -> str:
    """The doc's ```python blocks, joined in order."""
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 8, "docs/fsspec.md lost its examples"
    return "\n".join(blocks)


def _tagger(folder: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4, 2)).astype(np.float32)
    bias = rng.standard_normal(2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tagger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, folder / "tagger.onnx")
    save_file({"dense.weight": weight, "dense.bias": bias}, str(folder / "weights.safetensors"))


def _tiny_bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "b", "jet", "quark"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)


def _jets(folder: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(9)
    frame = pd.DataFrame(
        {"pt": rng.uniform(20, 500, 100), "eta": rng.uniform(-2.5, 2.5, 100), "label": 0}
    )
    folder.mkdir(parents=True)
    frame.to_csv(folder / "jets.csv", index=False)
    frame.to_parquet(folder / "jets.parquet", index=False)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(served root, master public key) of models.example.org."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("docs")
    _tagger(base / "src" / "tagger")
    _tiny_bert(base / "src" / "tiny-bert")
    _jets(base / "src" / "data" / "jets")
    publisher = create_repository(base / "srv" / "cvmfs", FQRN, settings=PublishSettings(workers=2))
    for source, ref in (("tagger", "hep/tagger:1"), ("tiny-bert", "hf/tiny-bert:1")):
        publish_model(publisher, base / "src" / source, ModelRef.parse(ref), aliases=("prod",))
    with publisher.transaction() as txn:
        txn.add_folder(base / "src" / "data", "/datasets")
        txn.commit()
    return base / "srv", publisher.keys.paths.master_public


def test_the_fsspec_guide_runs(
    published: tuple[Path, Path], nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    root, key = published
    server = nginx_factory(root)
    config = tmp_path / "client.conf"
    config.write_text(
        f"CVMFS_SERVER_URL={server.url}/cvmfs/@fqrn@\nCVMFS_PUBLIC_KEY={key}\n"
        f"CVMFS_CACHE_BASE={tmp_path / 'cache-base'}\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    script = (
        doc_script(DOC.read_text())
        .replace("/tmp/", f"{work}/")
        .replace("http://localhost:8000", server.url)
        .replace(f"/etc/cvmfs/keys/{FQRN}.pub", str(key))
    )
    (tmp_path / "guide.py").write_text(script)
    env = {**os.environ, "CVMFS_ML_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "guide.py")],
        capture_output=True, text=True, timeout=600, cwd=work, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"'{FQRN}/hep/tagger/1'" in out and f"'{FQRN}/hep/tagger/prod'" in out
    assert "(100, 3) ['pt', 'eta', 'label']" in out
    assert "100 100 ['pt', 'eta', 'label']" in out
    assert "torch.Size([1, 5, 16])" in out
    assert (work / "tagger-prod" / "tagger.onnx").is_file()
    assert json.loads((work / "tiny-bert" / "config.json").read_text())["hidden_size"] == 16
    # the configured cache and the one named in storage options both filled up
    for cache in (tmp_path / "cache-base", work / "cvmfs-ml-cache"):
        assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) > 10_000, cache
