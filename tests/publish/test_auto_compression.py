"""``auto`` compression's estimate: the quick look at 64 KiB gives the 1 MiB sample's answers."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.bench.generators import make_safetensors
from cvmfs_ml.publish import ingest
from cvmfs_ml.publish.ingest import zlib_pays

MIN_SAVING = 0.10  # PublishSettings' default
SAMPLE = 2**20


def full_sample_pays(sample: bytes) -> bool:
    """The estimate before the quick look: zlib level 1 over the whole sample."""
    return 1 - len(zlib.compress(sample, 1)) / len(sample) >= MIN_SAVING


def float_weights(dtype: str, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(SAMPLE // np.dtype(dtype).itemsize, dtype=np.float32) * 0.02
    return values.astype(dtype).tobytes()


def numbers_as_text() -> bytes:
    rng = np.random.default_rng(3)
    return b" ".join(b"%d" % x for x in rng.integers(0, 10**6, 500_000))


def samples(tmp_path: Path) -> dict[str, bytes]:
    text = b"".join(b'{"layer": %d, "name": "encoder.block.%d"}\n' % (i, i) for i in range(40_000))
    safetensors = tmp_path / "model.safetensors"
    make_safetensors(safetensors, 4 * 2**20)
    binaries = sorted(
        Path("/usr/lib/x86_64-linux-gnu").glob("libpython3*.so*"), key=lambda p: p.name
    ) or sorted(Path("/usr/bin").glob("python3*"))
    found = {
        "random": os.urandom(SAMPLE),
        "zlib stream": zlib.compress(numbers_as_text(), 6)[:SAMPLE],
        "float16 weights": float_weights("float16"),
        "float32 weights": float_weights("float32"),
        "safetensors with its JSON header": safetensors.read_bytes()[:SAMPLE],
        "text": text[:SAMPLE],
    }
    for binary in binaries[:1]:
        with binary.open("rb") as f:
            found[f"ELF {binary.name}"] = f.read(SAMPLE)
    return found


def test_the_quick_look_keeps_the_full_samples_answers(tmp_path: Path) -> None:
    contents = samples(tmp_path)
    answers = {name: zlib_pays(data, MIN_SAVING) for name, data in contents.items()}
    expected = {name: full_sample_pays(data) for name, data in contents.items()}
    assert answers == expected
    # the cases the choice is about: weights stay uncompressed, text and code are compressed
    assert answers["float16 weights"] is False and answers["random"] is False
    assert answers["text"] is True


def test_a_file_that_starts_incompressible_is_stored_as_it_is() -> None:
    """The price of the quick look, and why it is paid: a file whose first 64 KiB do not
    compress at all is stored uncompressed even if the rest of the sample would have paid."""
    head_then_text = os.urandom(64 * 2**10) + b"parameters " * 90_000
    assert full_sample_pays(head_then_text[:SAMPLE])
    assert zlib_pays(head_then_text[:SAMPLE], MIN_SAVING) is False


@pytest.fixture
def compressed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of what the estimate hands zlib, in order (the real zlib does the work)."""
    lengths: list[int] = []
    real = zlib.compress

    def counting(data: bytes, level: int = -1) -> bytes:
        lengths.append(len(data))
        return real(data, level)

    monkeypatch.setattr(ingest.zlib, "compress", counting)
    return lengths


@pytest.mark.parametrize("name", ["random", "zlib stream"])
def test_incompressible_bytes_are_told_on_64_kib(
    tmp_path: Path, compressed: list[int], name: str
) -> None:
    data = samples(tmp_path)[name]
    compressed.clear()  # making the samples compressed too
    assert zlib_pays(data, MIN_SAVING) is False
    assert compressed == [64 * 2**10]


def test_weights_still_get_the_whole_sample(compressed: list[int]) -> None:
    """float16 weights save 7-8%: too close to the threshold for 64 KiB to decide."""
    assert zlib_pays(float_weights("float16"), MIN_SAVING) is False
    assert compressed == [64 * 2**10, SAMPLE]
