"""The xor32 chunker against upstream's published vectors and a literal port of upstream's code.

Ground truth, in order of strength: the cut marks of upstream's unit test
(``test/unittests/t_chunk_detectors.cc``), the chunk lists ``cvmfs_server`` wrote into the
reference repository, and ``_UpstreamXor32`` below, a byte-by-byte Python port of
``Xor32Detector::DoFindNextCutMark`` (``cvmfs/ingestion/chunk_detector.cc``) fed the same
buffers. The fast code is compared against them with Hypothesis on random block splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_ml.cvmfs import chunking
from cvmfs_ml.cvmfs.chunking import (
    UPSTREAM_DEFAULT,
    ChunkParams,
    Xor32Chunker,
    chunk_spans,
    cut_points,
    rolling_xor32,
    upstream_prng_bytes,
)
from cvmfs_ml.errors import FormatError

# t_chunk_detectors.cc, Xor32ChunkDetectorSlow: 100 MiB of Prng seed 42, min/avg/max below.
UPSTREAM_VECTOR_PARAMS = ChunkParams(512000, 1024000, 2048000)
UPSTREAM_VECTOR_CUTS = [
    742752, 2790752, 3521796, 4188893, 4940543, 5884591, 7131564,
    8520617, 9159233, 9999783, 11202120, 11778185, 13781177, 15331152,
    16497018, 17410317, 19391774, 20086877, 20763223, 21346744, 22075173,
    22705444, 23557037, 24461261, 25118505, 25663669, 26333579, 27763062,
    28369273, 29586929, 30171732, 30794768, 31811364, 32408599, 33689064,
    34678262, 36410687, 37096663, 37682005, 38269900, 39931592, 41347607,
    42701845, 44350286, 44925654, 45893350, 47770173, 48332690, 49303250,
    49861260, 50727512, 51578678, 52176356, 52949949, 54228704, 54843051,
    55796214, 56694940, 58092222, 59294196, 60381155, 61509784, 62850141,
    63505051, 64168046, 64925423, 66252082, 67232078, 68005369, 68615410,
    69454686, 70276575, 71308716, 73356716, 73946267, 74775664, 75509293,
    77487075, 78606807, 79732133, 80467148, 81185709, 82588680, 83547234,
    84220971, 85992169, 86979928, 87845294, 88392648, 89241756, 89980293,
    91129752, 91891024, 92493793, 93792263, 94393106, 95782791, 96813116,
    97723756, 98618891, 99707336, 101755336, 103405168, 104269441,
]  # fmt: skip
UPSTREAM_VECTOR_SIZE = 104857600

# t_chunk_detectors.cc, Xor32: (input byte, xor32 state after it), from state 0.
UPSTREAM_XOR32_TABLE = [
    (5, 5), (255, 245), (0, 490), (32, 1012), (27, 2035), (11, 4077), (87, 8077),
    (128, 16282), (127, 32587), (224, 65142), (63, 130259), (11, 260525), (1, 521051),
    (103, 1042129), (73, 2084331), (22, 4168640), (235, 8337259), (17, 16674503),
    (3, 33349005), (90, 66698048), (210, 133396050), (163, 266791943), (12, 533583874),
    (79, 1067167819), (53, 2134335651), (2, 4268671300), (100, 4242375404),
    (193, 4189783321), (64, 4084599410), (242, 3874231318), (14, 3453495330),
    (111, 2612023339), (83, 929079301), (253, 1858158839), (207, 3716317473),
    (172, 3137667822), (62, 1980368354), (190, 3960736634), (114, 3626505862),
    (39, 2958044459), (6, 1621121616), (175, 3242243087), (93, 2189518915),
    (238, 84070504), (184, 168140904), (84, 336281732), (29, 672563477), (200, 1345127138),
]  # fmt: skip


# ------------------------------------------------------------------------------------------
# The slow reference: upstream's detector, line by line
# ------------------------------------------------------------------------------------------


class _UpstreamXor32:
    """``Xor32Detector`` from ``cvmfs/ingestion/chunk_detector.{h,cc}``, ported literally.

    Python ints do not wrap, which only matters for ``min < 32`` at offset 0, where upstream
    asserts anyway; there the port keeps the state reset at the chunk start, as for ``L > 0``.
    """

    def __init__(self, mn: int, avg: int, mx: int) -> None:
        self.mn, self.mx = mn, mx
        self.threshold = 0xFFFFFFFF // avg
        self.last_cut = self.offset = self.xor32_ptr = self.xor32 = 0

    def find_next_cut_mark(self, buf: bytes) -> int:
        result = self._do_find_next_cut_mark(buf)
        if result == 0:
            self.offset += len(buf)
        return result

    def _cut(self, offset: int) -> int:
        self.xor32, self.xor32_ptr, self.last_cut = 0, offset, offset
        return offset

    def _no_cut(self, offset: int) -> int:
        self.xor32_ptr = offset
        return 0

    def _step(self, byte: int) -> None:
        self.xor32 = ((self.xor32 << 1) ^ byte) & 0xFFFFFFFF

    def _check_threshold(self) -> bool:
        # abs(static_cast<int32_t>(xor32_) - kMagicNumber) < threshold_, in int32 arithmetic
        signed = self.xor32 - (1 << 32) if self.xor32 >= 1 << 31 else self.xor32
        diff = (signed - 0x7FFFFFFF + (1 << 31)) % (1 << 32) - (1 << 31)
        magnitude = -(1 << 31) if diff == -(1 << 31) else abs(diff)  # abs(INT_MIN) == INT_MIN
        return magnitude < self.threshold

    def _do_find_next_cut_mark(self, buf: bytes) -> int:
        global_offset = max(self.last_cut + self.mn - 32, self.xor32_ptr)
        if global_offset >= self.offset + len(buf):
            return self._no_cut(global_offset)
        i = global_offset - self.offset
        precompute_end = min(self.last_cut + self.mn - self.offset, len(buf))
        while i < precompute_end:
            self._step(buf[i])
            i += 1
        max_end = self.last_cut + self.mx - self.offset
        while i < min(max_end, len(buf)):
            self._step(buf[i])
            if self._check_threshold():
                return self._cut(i + self.offset)
            i += 1
        if i == max_end:
            return self._cut(i + self.offset)
        return self._no_cut(i + self.offset)


def _reference_cuts(data: bytes, params: ChunkParams, sizes: list[int] | None = None) -> list[int]:
    """Cut marks as upstream's test harness collects them, minus a cut at EOF."""
    detector = _UpstreamXor32(params.min_size, params.avg_size, params.max_size)
    cuts, pos = [], 0
    for size in sizes or [len(data)]:
        buf = data[pos : pos + size]
        pos += size
        while (cut := detector.find_next_cut_mark(buf)) != 0:
            cuts.append(cut)
    assert pos >= len(data)
    return [c for c in cuts if c < len(data)]


def _feed_all(data: bytes | np.ndarray, params: ChunkParams, sizes: list[int]) -> list[int]:
    chunker = Xor32Chunker(params)
    cuts, pos = [], 0
    for size in sizes:
        cuts += chunker.feed(data[pos : pos + size])
        pos += size
    assert chunker.position == len(data)
    return cuts


def _split(n: int, block: int) -> list[int]:
    return [min(block, n - i) for i in range(0, n, block)] or [0]


def _plant(data: bytearray, p: int, target: int) -> None:
    """Make the window ending at ``p`` roll to ``target``: bit 0 of ``data[p-k]`` is bit k."""
    window = int(rolling_xor32(bytes(data[p - 31 : p + 1]))[-1])
    for k in range(32):
        data[p - k] ^= ((window ^ target) >> k) & 1


@contextlib.contextmanager
def _tuned(**knobs: int) -> Iterator[None]:
    """Shrink the chunker's block and filter sizes so small inputs take the large-input paths."""
    saved = {name: getattr(chunking, name) for name in knobs}
    for name, value in knobs.items():
        setattr(chunking, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(chunking, name, value)


# ------------------------------------------------------------------------------------------
# Upstream's vectors
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_data() -> np.ndarray:
    return upstream_prng_bytes(42, UPSTREAM_VECTOR_SIZE)


def test_upstream_vector_has_104_marks() -> None:
    assert len(UPSTREAM_VECTOR_CUTS) == 104
    assert UPSTREAM_VECTOR_PARAMS.threshold == 4194


def test_cut_points_reproduce_upstream_vector(upstream_data: np.ndarray) -> None:
    cuts = cut_points(upstream_data, UPSTREAM_VECTOR_PARAMS)
    assert cuts == UPSTREAM_VECTOR_CUTS
    sizes = [length for _, length in chunk_spans(len(upstream_data), cuts)]
    assert min(sizes[:-1]) >= 512000
    assert max(sizes) <= 2048000


@pytest.mark.parametrize("block", [102400, 512000, 1024000, 10485760, 64 * 2**20, 999_983])
def test_feed_reproduces_upstream_vector_for_any_block_size(
    upstream_data: np.ndarray, block: int
) -> None:
    # upstream checks the buffer sizes 100 kB, min, avg and 10 MB; a prime and 64 MiB added
    sizes = _split(len(upstream_data), block)
    assert _feed_all(upstream_data, UPSTREAM_VECTOR_PARAMS, sizes) == UPSTREAM_VECTOR_CUTS


def test_filter_and_exact_paths_agree_on_upstream_data(upstream_data: np.ndarray) -> None:
    scanner = chunking._Scanner(chunking._Rule.of(UPSTREAM_VECTOR_PARAMS))
    assert scanner.rule.run == 18
    for start in range(0, 8 * 2**20, 2**20):
        buf = upstream_data[start : start + 2**20]
        assert scanner.first_trigger(buf, 31, use_filter=True) == scanner.first_trigger(
            buf, 31, use_filter=False
        )


def test_rolling_xor32_matches_upstream_table() -> None:
    values = rolling_xor32(bytes(b for b, _ in UPSTREAM_XOR32_TABLE))
    assert values.dtype == np.uint32
    assert values.tolist() == [w for _, w in UPSTREAM_XOR32_TABLE]
    assert values[:4].tolist() == [5, 245, 490, 1012]


def test_rolling_xor32_only_depends_on_last_32_bytes() -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 1000, dtype=np.uint8)
    state, expected = 0, []
    for byte in data.tolist():
        state = ((state << 1) ^ byte) & 0xFFFFFFFF
        expected.append(state)
    assert rolling_xor32(data).tolist() == expected
    assert rolling_xor32(data[500:])[31:].tolist() == expected[531:]
    assert rolling_xor32(b"").tolist() == []


def test_prng_matches_a_literal_port_of_prng_h() -> None:
    state, expected = 42, []
    for _ in range(3000):
        state = (6364136223846793005 * state + 1442695040888963407) % 2**64
        expected.append(int(float(state) * 256.0 / 2.0**64) % 256)
    got = upstream_prng_bytes(42, 3000)
    assert got.dtype == np.uint8
    assert got.tolist() == expected
    # blocks of the vectorised generator join seamlessly
    long = upstream_prng_bytes(42, 3 * chunking._PRNG_BLOCK + 7)
    assert long[:3000].tolist() == expected
    assert upstream_prng_bytes(7, 0).tolist() == []
    assert upstream_prng_bytes(7, 100).tolist() != upstream_prng_bytes(8, 100).tolist()


def test_prng_rounds_near_two_to_the_64_to_byte_zero() -> None:
    # a state within 2^10 of 2^64 becomes the double 2^64, so Next(256) yields 256 % 256 == 0
    a, c = 6364136223846793005, 1442695040888963407
    seed = ((2**64 - 5 - c) * pow(a, -1, 2**64)) % 2**64
    assert upstream_prng_bytes(seed, 1).tolist() == [0]


# ------------------------------------------------------------------------------------------
# What cvmfs_server wrote into the reference repository
# ------------------------------------------------------------------------------------------


def _published_chunks(repo_root: Path, name: str) -> tuple[bytes, list[int]]:
    served = repo_root / "cvmfs" / "ref.test.local"
    body = (served / ".cvmfspublished").read_bytes().split(b"--\n")[0].decode()
    root = next(line[1:] for line in body.splitlines() if line.startswith("C"))
    catalog = zlib.decompress((served / "data" / root[:2] / f"{root[2:]}C").read_bytes())
    db = sqlite3.connect(":memory:")
    db.deserialize(catalog)
    rows = db.execute(
        "SELECT k.offset, k.size, k.hash FROM chunks k JOIN catalog c"
        " ON c.md5path_1 = k.md5path_1 AND c.md5path_2 = k.md5path_2"
        " WHERE c.name = ? ORDER BY k.offset",
        (name,),
    ).fetchall()
    pieces = []
    for _, size, digest in rows:
        hexd = digest.hex()
        piece = zlib.decompress((served / "data" / hexd[:2] / f"{hexd[2:]}P").read_bytes())
        assert len(piece) == size
        pieces.append(piece)
    return b"".join(pieces), [offset for offset, _, _ in rows]


@pytest.mark.parametrize("name", ["random-24MiB.bin", "zeros-20MiB.bin"])
def test_cut_points_match_cvmfs_server_chunks(reference_repo: Path, name: str) -> None:
    data, offsets = _published_chunks(reference_repo, name)
    manifest = json.loads((reference_repo / "manifest-v2.json").read_text())
    entry = next(e for e in manifest if e["path"].endswith(name))
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    params = ChunkParams(524288, 1048576, 2097152)  # the repository's CVMFS_*_CHUNK_SIZE
    assert cut_points(data, params) == offsets[1:]
    assert _feed_all(data, params, _split(len(data), 3 * 2**20 + 1)) == offsets[1:]


# ------------------------------------------------------------------------------------------
# Equivalence with the literal port
# ------------------------------------------------------------------------------------------

_small_params = st.builds(
    lambda mn, da, dm: ChunkParams(mn, mn + da, mn + da + dm),
    st.integers(1, 160),
    st.integers(1, 200),
    st.integers(1, 300),
)


@st.composite
def _data(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 2500))
    kind = draw(st.sampled_from(["random", "zeros", "pattern", "mixed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    if kind == "random":
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if kind == "zeros":
        return bytes(n)
    if kind == "pattern":
        unit = rng.integers(0, 256, draw(st.integers(1, 40)), dtype=np.uint8).tobytes()
        return (unit * (n // len(unit) + 1))[:n]
    out = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    for _ in range(draw(st.integers(0, 6))):
        a = draw(st.integers(0, n))
        out[a : a + draw(st.integers(0, 600))] = bytes([draw(st.integers(0, 255))]) * 600
    return bytes(out[:n])


def _random_split(draw: st.DrawFn, n: int) -> list[int]:
    sizes, left = [], n
    while left > 0:
        size = min(left, draw(st.one_of(st.integers(1, 40), st.integers(1, 1500))))
        sizes.append(size)
        left -= size
    return sizes


@settings(max_examples=250, deadline=None, derandomize=True)
@given(params=_small_params, data=_data(), split=st.data())
def test_matches_upstream_port_on_small_parameters(
    params: ChunkParams, data: bytes, split: st.DataObject
) -> None:
    expected = _reference_cuts(data, params)
    assert cut_points(data, params) == expected
    sizes = _random_split(split.draw, len(data))
    assert _reference_cuts(data, params, sizes) == expected  # upstream is split-invariant too
    assert _feed_all(data, params, sizes) == expected
    spans = chunk_spans(len(data), expected)
    assert sum(length for _, length in spans) == len(data)
    if spans:
        assert all(length <= params.max_size for _, length in spans)
        assert all(length >= params.min_size for _, length in spans[:-1])


_TRIGGERS = [2**31 - 4194, 2**31, 2**31 + 4192, 0xFFFFFFFF]
# just outside the interval; the last three pass the bit-run filter only in part or not at all
_NEAR_MISSES = [2**31 - 4195, 2**31 + 4193, 0xFFFFFFFE, 0x7FFFE000, 0x80001F40, 0x00000123]


@settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(40, 3000),
    plants=st.lists(
        st.tuples(st.integers(31, 2999), st.sampled_from(_TRIGGERS + _NEAR_MISSES)), max_size=12
    ),
    fill=st.sampled_from([None, 0x00, 0x07, 0xFF]),
    mn=st.integers(1, 300),
    knobs=st.sampled_from(
        [
            {"_FILTER_MIN_LEN": 0, "_SCAN_BLOCK": 64, "_VERIFY_WORDS": 1},
            {"_FILTER_MIN_LEN": 0, "_SCAN_BLOCK": 1000, "_VERIFY_WORDS": 16},
            {"_FILTER_MIN_LEN": 0, "_SCAN_BLOCK": 7, "_VERIFY_WORDS": 2},
            {},
        ]
    ),
    split=st.data(),
)
def test_bit_run_filter_matches_upstream_port(
    seed: int,
    n: int,
    plants: list[tuple[int, int]],
    fill: int | None,
    mn: int,
    knobs: dict[str, int],
    split: st.DataObject,
) -> None:
    # avg as in upstream's vector (T = 4194), so the filter is on; planted windows trigger
    params = ChunkParams(mn, 1024000, 2048000)
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    if fill is not None:  # long runs that produce dense candidates (0x07) or none (0x00)
        a = int(rng.integers(0, n))
        data[a : a + 1200] = bytes([fill]) * len(data[a : a + 1200])
    for p, target in plants:
        if p < n:
            _plant(data, p, target)
    blob = bytes(data)
    expected = _reference_cuts(blob, params)
    with _tuned(**knobs):
        assert cut_points(blob, params) == expected
        assert _feed_all(blob, params, _random_split(split.draw, n)) == expected


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------


def test_zeros_are_cut_at_max_size_including_a_multiple_of_max() -> None:
    # t_chunk_detectors.cc, ZerosBufferPowerOfTwo (CVM-957): size is a multiple of max
    size = 16 * 2**20
    params = ChunkParams(size // 64, size // 32, size // 16)
    zeros = np.zeros(size, dtype=np.uint8)
    expected = list(range(size // 16, size, size // 16))
    assert cut_points(zeros, params) == expected
    assert _feed_all(zeros, params, _split(size, 512000)) == expected
    assert cut_points(np.zeros(size + 1, dtype=np.uint8), params) == [*expected, size]


def test_file_of_min_size_is_never_cut() -> None:
    params = ChunkParams(64, 128, 256)
    data = bytearray(b"\x01" * 65)  # W == 0xFFFFFFFF everywhere: every tested byte triggers
    assert not params.might_find_chunks(64)
    assert params.might_find_chunks(65)
    assert cut_points(bytes(data[:64]), params) == []
    assert cut_points(bytes(data), params) == [64]  # min + 1: a one-byte last chunk
    assert chunk_spans(65, [64]) == [(0, 64), (64, 1)]


def test_min_plus_one_without_trigger_is_one_chunk() -> None:
    params = ChunkParams(64, 128, 256)
    assert cut_points(bytes(65), params) == []


def test_hard_cut_at_eof_is_not_a_cut_until_more_data_arrives() -> None:
    params = ChunkParams(64, 128, 256)
    assert cut_points(bytes(256), params) == []
    assert cut_points(bytes(257), params) == [256]
    chunker = Xor32Chunker(params)
    assert chunker.feed(bytes(200)) == []
    assert chunker.feed(bytes(56)) == []  # the hard cut at 256 is held back
    assert chunker.position == 256
    assert chunker.feed(b"") == []
    assert chunker.feed(bytes(1)) == [256]
    assert chunker.feed(bytes(600)) == [512, 768]


def test_trigger_at_block_boundary() -> None:
    params = ChunkParams(64, 1024000, 2048000)
    data = bytearray(np.random.default_rng(9).integers(0, 256, 500, dtype=np.uint8).tobytes())
    _plant(data, 300, 2**31)
    expected = _reference_cuts(bytes(data), params)
    assert expected == [300]
    for split in (300, 301, 299):
        chunker = Xor32Chunker(params)
        got = chunker.feed(bytes(data[:split])) + chunker.feed(bytes(data[split:]))
        assert got == [300]
    assert _feed_all(bytes(data), params, [1] * 500) == [300]


def test_min_below_window_resets_at_chunk_start() -> None:
    # upstream asserts min >= 32; here the window never reaches back past the chunk start
    params = ChunkParams(4, 8, 16)
    data = np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8).tobytes()
    assert cut_points(data, params) == _reference_cuts(data, params)


def test_accepts_every_buffer_type() -> None:
    data = np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8)
    params = ChunkParams(100, 200, 400)
    expected = cut_points(data.tobytes(), params)
    assert len(expected) > 5
    assert cut_points(bytearray(data.tobytes()), params) == expected
    assert cut_points(memoryview(data.tobytes()), params) == expected
    assert cut_points(data.view(np.uint32), params) == expected
    assert cut_points(memoryview(array("I", data.tobytes())), params) == expected
    assert cut_points(data.reshape(64, 64), params) == expected
    doubled = np.repeat(data, 2).tobytes()
    assert cut_points(memoryview(doubled)[::2], params) == expected  # strided: copied
    assert cut_points(np.repeat(data, 2)[::2], params) == expected


def test_upstream_defaults() -> None:
    assert ChunkParams(4194304, 8388608, 16777216) == UPSTREAM_DEFAULT
    assert UPSTREAM_DEFAULT.threshold == 511
    assert chunking._Rule.of(UPSTREAM_DEFAULT).run == 22


@pytest.mark.parametrize(
    ("mn", "avg", "mx"),
    [(0, 2, 3), (-1, 2, 3), (4, 4, 8), (4, 8, 8), (8, 4, 16), (4, 3, 2), (1.5, 4, 8)],
)
def test_invalid_params_raise_format_error(mn: int, avg: int, mx: int) -> None:
    with pytest.raises(FormatError):
        ChunkParams(mn, avg, mx)


def test_chunk_spans() -> None:
    assert chunk_spans(10, [3, 7]) == [(0, 3), (3, 4), (7, 3)]
    assert chunk_spans(10, []) == [(0, 10)]
    assert chunk_spans(10, [3, 10]) == [(0, 3), (3, 7)]  # a cut at EOF makes no empty chunk
    assert chunk_spans(0, []) == []
    for bad in ([0], [5, 5], [7, 3], [11]):
        with pytest.raises(FormatError):
            chunk_spans(10, bad)
