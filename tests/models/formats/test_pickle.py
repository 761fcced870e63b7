"""Pickle and joblib: recognised from the PROTO opcode, never unpickled, always unsafe."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.models.formats import ModelFormatError, describe, detect


def test_plain_pickle(tmp_path: Path) -> None:
    path = tmp_path / "blob.dat"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    assert detect(path) == "pickle"
    desc = describe(path)
    assert desc.format == "pickle"
    assert desc.unsafe is True
    assert any("arbitrary code" in w for w in desc.warnings)
    assert desc.metadata["protocol"] == 4
    assert desc.metadata["globals"] == []


def test_globals_are_listed_without_importing_them(tmp_path: Path) -> None:
    # Protocol 2 GLOBAL + NEWOBJ + BUILD of a class that is not installed here.
    blob = b"\x80\x02csklearn.linear_model._base\nLinearRegression\nq\x00)\x81q\x01}q\x02b."
    path = tmp_path / "model.pkl"
    path.write_bytes(blob)
    desc = describe(path)
    assert desc.metadata["globals"] == ["sklearn.linear_model._base.LinearRegression"]
    assert desc.framework == "scikit-learn"
    # Protocol 4 uses STACK_GLOBAL with memoised strings.
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=collections.Counter()), protocol=4))
    assert describe(path).metadata["globals"] == ["collections.OrderedDict", "collections.Counter"]


def test_protocol_zero_needs_a_pickle_name(tmp_path: Path) -> None:
    data = pickle.dumps({"a": 1}, protocol=0)
    named = tmp_path / "old.pkl"
    named.write_bytes(data)
    assert detect(named) == "pickle"
    assert describe(named).metadata["protocol"] == 0
    other = tmp_path / "old.txt"
    other.write_bytes(data)
    assert detect(other) is None


def test_random_bytes_after_proto_are_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(b"\x80\x02\xff\xfe\xfd" + bytes(100))
    assert detect(path) is None


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_joblib_files(tmp_path: Path, compress: object) -> None:
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "model.bin"
    joblib.dump({"coef": np.arange(1000.0), "name": "linear"}, path, compress=compress)
    assert detect(path) == "joblib"
    desc = describe(path)
    assert desc.format == "joblib" and desc.unsafe
    assert "joblib.numpy_pickle.NumpyArrayWrapper" in desc.metadata["globals"]
    assert "numpy.dtype" in desc.metadata["globals"]
    expected = None if compress == 0 else compress[0] if isinstance(compress, tuple) else "zlib"
    assert desc.metadata["compression"] == expected


def test_compressed_non_pickle_is_not_joblib(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "notes.joblib"
    path.write_bytes(gzip.compress(b"hello, not a pickle"))
    assert detect(path) is None
    with pytest.raises(ModelFormatError, match="not a pickle"):
        describe(path)
