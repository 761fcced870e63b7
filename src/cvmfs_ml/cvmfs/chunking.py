"""Content-defined chunking exactly as ``cvmfs_server`` does it ("xor32", cvmfs-format.md §7).

Mirrors ``cvmfs/ingestion/chunk_detector.{h,cc}`` (``Xor32Detector``) and ``cvmfs/util/prng.h``.
Cut points must be bit-identical to upstream's, otherwise files published here do not share
chunks with files published by ``cvmfs_server`` with the same parameters.

The rule (§7.2). ``W(p) = XOR_{k=0..31} (data[p-k] << k) mod 2^32`` is upstream's rolling value
``x = (x << 1) ^ byte`` read after byte ``p``. From a chunk start ``L`` the positions
``p = L+min .. L+max-1`` are tested (the window is primed on the 32 bytes before ``L+min``); the
first ``p`` with ``2^31-T <= W(p) <= 2^31+T-2`` or ``W(p) == 0xFFFFFFFF`` (``T = 0xFFFFFFFF //
avg``) ends the chunk ``[L, p)``, so the triggering byte starts the next chunk. Without a
trigger the chunk is cut hard at ``L+max``. The last chunk is the remainder.

Why this is fast without a byte loop (performance-notes.md §4):

* ``W`` depends only on the last 32 bytes, so ``W`` for a whole block is computed with five
  vectorised "log-steps" instead of a sequential loop (:func:`rolling_xor32`).
* A trigger needs bits ``t..30`` of ``W`` to be all equal (``2^t >= T``), and bit ``j >= 7`` of
  ``W(p)`` is the parity ``C[p-j]`` of one byte "diagonal" (bit 0 of ``data[m]``, bit 1 of
  ``data[m+1]``, ... bit 7 of ``data[m+7]``). ``C`` costs a few cheap ``uint8`` passes; packed to
  bits, a run of equal bits is found with a handful of ``uint64`` word operations. Only the rare
  positions that pass this necessary test get their exact ``W`` computed. Data that defeats the
  filter (many candidates) falls back to the exact log-step, so results never depend on it.
* Only ``[L+min-31, cut)`` is ever scanned, in blocks of 512 KiB that stay in cache. numpy
  releases the GIL, so two threads can chunk two files.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cvmfs_ml.errors import FormatError

__all__ = [
    "UPSTREAM_DEFAULT",
    "WINDOW",
    "ChunkParams",
    "Xor32Chunker",
    "chunk_spans",
    "cut_points",
    "rolling_xor32",
    "upstream_prng_bytes",
]

WINDOW = 32
"""Bytes that influence the rolling value (upstream ``kXor32Window``)."""

_CONTEXT = WINDOW - 1  # bytes before a tested position that its window reads
_U32_MAX = 0xFFFFFFFF
_SCAN_BLOCK = 1 << 19  # cache-resident scan block: 2.7 GB/s here, 1 MiB 2.5, 2 MiB 1.1
_FILTER_MIN_LEN = 4096  # below this the exact log-step is cheaper than the filter's overhead
_FILTER_MIN_RUN = 16  # a filter with shorter runs lets through too many candidates to pay off
_VERIFY_WORDS = 16  # 64-position words of candidates checked before the exact pass takes over
_K = np.arange(WINDOW, dtype=np.int64)
_K32 = _K.astype(np.uint32)


@dataclass(frozen=True)
class ChunkParams:
    """Minimum, average and maximum chunk size (``CVMFS_{MIN,AVG,MAX}_CHUNK_SIZE``).

    Upstream's defaults are 4, 8 and 16 MiB. The same three numbers must be used as the
    publisher of a repository for chunks to deduplicate against it. Upstream additionally
    asserts ``min >= 32``; smaller values are accepted here (the window then never reaches back
    past the chunk start, as with upstream's reset state) but cannot be compared with upstream.
    """

    min_size: int = 4 * 2**20
    avg_size: int = 8 * 2**20
    max_size: int = 16 * 2**20

    def __post_init__(self) -> None:
        sizes = (self.min_size, self.avg_size, self.max_size)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise FormatError("chunk parameters", f"sizes must be integers, got {sizes!r}")
        if not 0 < self.min_size < self.avg_size < self.max_size:
            raise FormatError(
                "chunk parameters",
                f"need 0 < min < avg < max, got min={self.min_size} avg={self.avg_size} "
                f"max={self.max_size}",
            )

    @property
    def threshold(self) -> int:
        """``T = floor(0xFFFFFFFF / avg)``, the half-width of the trigger interval."""
        return _U32_MAX // self.avg_size

    def might_find_chunks(self, size: int) -> bool:
        """Whether a file of ``size`` bytes goes through the chunker at all (``size > min``)."""
        return size > self.min_size


UPSTREAM_DEFAULT = ChunkParams()


# --------------------------------------------------------------------------------------------
# The rolling value and the trigger test
# --------------------------------------------------------------------------------------------


def _as_u8(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A flat ``uint8`` view of ``data`` (no copy for bytes, buffers and contiguous arrays)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    elif view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return np.frombuffer(view, dtype=np.uint8)


def rolling_xor32(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Upstream's ``xor32`` state after each byte of ``data``, starting from state 0.

    Vectorised with a log-step: after the steps with shifts ``1, 2, ..., s`` the value at ``p``
    is ``XOR_{k<2s} data[p-k] << k`` (induction: ``y[p] ^ (y[p-s] << s)`` adds the terms
    ``k = s .. 2s-1``). After ``s = 16`` it holds all ``k < 32``; terms with ``k >= 32`` are
    shifted out of 32 bits, so this equals the sequential ``x = (x << 1) ^ byte`` exactly.
    """
    y = _as_u8(data).astype(np.uint32)
    n = len(y)
    tmp = np.empty_like(y)
    for s in (1, 2, 4, 8, 16):
        if s >= n:
            break
        np.left_shift(y[: n - s], s, out=tmp[: n - s])
        np.bitwise_xor(y[s:], tmp[: n - s], out=y[s:])
    return y


@dataclass(frozen=True)
class _Rule:
    """The trigger interval of one ``avg`` and the strength of the bit-run prefilter."""

    threshold: int
    run: int  # bits t..30 of W that a trigger needs equal; 0 when the filter is not used

    @classmethod
    def of(cls, params: ChunkParams) -> _Rule:
        t = params.threshold
        # 2^31-T <= W <= 2^31+T-2 implies 2^31-2^b <= W < 2^31+2^b with b = bit length of T-1,
        # so bits b..30 are all 1 (bit 31 = 0) or all 0 (bit 31 = 1); 0xFFFFFFFF has them all 1.
        # Bits below 7 of W are not single diagonals, hence b >= 7.
        b = max(7, (t - 1).bit_length()) if t > 0 else 7
        run = 31 - b
        return cls(t, run if run >= _FILTER_MIN_RUN else 0)

    def triggers(self, w: np.ndarray) -> np.ndarray:
        """Boolean mask of the ``uint32`` values ``w`` that end a chunk.

        The closed form of upstream's ``abs((int32)x - 0x7FFFFFFF) < T``; with two's-complement
        wrap-around ``abs(INT_MIN)`` stays negative, which is the ``0xFFFFFFFF`` case.
        """
        hit = w == np.uint32(_U32_MAX)
        if self.threshold > 0:
            low = np.uint32(2**31 - self.threshold)
            hit |= (w - low) <= np.uint32(2 * self.threshold - 2)
        return hit


def _window_values(buf: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Exact ``W`` at a few ``positions`` (each ``>= 31``) of ``buf``."""
    idx = positions[:, None] - _K[None, :]
    return np.bitwise_xor.reduce(buf[idx].astype(np.uint32) << _K32, axis=1)


def _shift_down(x: np.ndarray, s: int) -> np.ndarray:
    """Packed bit stream moved so that bit ``m`` of the result is bit ``m + s`` of ``x``."""
    out = x >> np.uint64(s)
    out[:-1] |= x[1:] << np.uint64(64 - s)
    return out


class _Scanner:
    """Finds the first trigger in a buffer; owns scratch space reused across blocks.

    Reusing the scratch arrays matters: fresh ``np.empty`` blocks of this size come from
    ``mmap`` and page-faulting them in costs as much as the arithmetic.
    """

    def __init__(self, rule: _Rule) -> None:
        self.rule = rule
        self._e = np.empty(0, dtype=np.uint8)
        self._tmp = np.empty(0, dtype=np.uint8)

    def _scratch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._e) < n:
            self._e = np.empty(n, dtype=np.uint8)
            self._tmp = np.empty(n, dtype=np.uint8)
        return self._e[:n], self._tmp[:n]

    def candidates(self, buf: np.ndarray, start: int) -> tuple[np.ndarray, bool]:
        """Positions ``p >= start`` of ``buf`` that may trigger, and whether that is all of them.

        With all of them (the flag), the positions are a superset of the triggers; otherwise
        they are the first few, in order.

        Bit ``j`` (``7 <= j <= 31``) of ``W(p)`` is ``C[p-j]``, the parity of bit ``i`` of
        ``buf[p-j+i]`` over ``i = 0..7`` (the byte ``buf[p-k]`` lands on bits ``k..k+7``). A
        trigger needs ``C[p-30 .. p-31+run]`` (bits ``31-run .. 30``) all equal, and when they
        are all 0, bit 31 (``C[p-31]``) must be 1.
        """
        n, run = len(buf), self.rule.run
        e, tmp = self._scratch(n)
        # C by a log-step with right shifts: bit 0 of e[m] ends as XOR_i bit i of buf[m+i].
        np.right_shift(buf[1:], 1, out=tmp[: n - 1])
        np.bitwise_xor(buf[: n - 1], tmp[: n - 1], out=e[: n - 1])
        np.right_shift(e[2 : n - 1], 2, out=tmp[: n - 3])
        np.bitwise_xor(e[: n - 3], tmp[: n - 3], out=e[: n - 3])
        np.right_shift(e[4 : n - 3], 4, out=tmp[: n - 7])
        np.bitwise_xor(e[: n - 7], tmp[: n - 7], out=e[: n - 7])
        e[n - 7 :] = 0  # incomplete diagonals; only positions p >= n would read them
        np.bitwise_and(e, 1, out=e)
        packed = np.packbits(e.view(np.bool_), bitorder="little")
        words = np.zeros((len(packed) + 15) // 8, dtype="<u8")  # >= 1 word of zero slack
        words.view(np.uint8)[: len(packed)] = packed

        # "C[m .. m+run-1] all equal" = no transition C[i] != C[i+1] for i in m .. m+run-2.
        same = words ^ _shift_down(words, 1)
        np.invert(same, out=same)
        have = 1
        while have < run - 1:
            s = min(have, run - 1 - have)
            same &= _shift_down(same, s)
            have += s
        # A run of ones is fine whatever bit 31 is; a run of zeros needs C[m-1] == 1.
        before = words << np.uint64(1)
        before[1:] |= words[:-1] >> np.uint64(63)
        before |= words
        same &= before

        nonzero = np.flatnonzero(same)
        complete = len(nonzero) <= _VERIFY_WORDS
        nonzero = nonzero[:_VERIFY_WORDS]
        bits = np.unpackbits(same[nonzero].view(np.uint8), bitorder="little").reshape(-1, 64)
        rows, cols = np.nonzero(bits)
        positions = nonzero[rows] * 64 + cols + 30  # m = p - 30
        return positions[(positions >= start) & (positions < n)], complete

    def first_trigger(self, buf: np.ndarray, start: int, use_filter: bool | None = None) -> int:
        """Index of the first ``p >= start`` (``start >= 31``) of ``buf`` that triggers, or -1.

        ``buf[p-31 .. p]`` is the whole window of ``p``, so ``buf`` carries 31 bytes of context.
        ``use_filter`` forces a path (tests); by default the filter is used where it pays off.
        """
        n, rule = len(buf), self.rule
        if start >= n:
            return -1
        if use_filter is None:
            use_filter = n >= _FILTER_MIN_LEN
        if use_filter and rule.run > 0:
            positions, complete = self.candidates(buf, start)
            if len(positions):
                hit = np.flatnonzero(rule.triggers(_window_values(buf, positions)))
                if len(hit):
                    return int(positions[hit[0]])
            if complete:
                return -1
            # Structured data defeating the filter: the exact pass below decides.
        hit = np.flatnonzero(rule.triggers(rolling_xor32(buf)[start:]))
        return int(hit[0]) + start if len(hit) else -1


# --------------------------------------------------------------------------------------------
# The chunker
# --------------------------------------------------------------------------------------------


class Xor32Chunker:
    """Streaming cut-point detector: feed a file's bytes in blocks of any size, get cut offsets.

    Mirrors upstream's ``Xor32Detector::FindNextCutMark``. Only the last 31 bytes are kept
    between blocks, so memory stays proportional to the block size.

    A hard cut that lands exactly at the end of the data fed so far is held back and reported
    by the next non-empty :meth:`feed`: if the file ends there it is no cut (no empty chunk).
    Hence the concatenated results of all feeds equal :func:`cut_points` of the whole file,
    however the file was split into blocks.
    """

    def __init__(self, params: ChunkParams) -> None:
        self._params = params
        self._scanner = _Scanner(_Rule.of(params))
        self._pos = 0  # bytes fed so far
        self._last_cut = 0  # start L of the current chunk (may be a held-back cut)
        self._held: int | None = None  # a cut at exactly self._pos, not reported yet
        self._tail = np.zeros(0, dtype=np.uint8)  # bytes [pos - len(tail), pos)

    @property
    def params(self) -> ChunkParams:
        """The sizes this chunker cuts with."""
        return self._params

    @property
    def position(self) -> int:
        """Bytes fed so far."""
        return self._pos

    def feed(self, block: bytes | bytearray | memoryview | np.ndarray) -> list[int]:
        """Consume the next bytes of the file; return the cut offsets decided so far, in order.

        Each offset is absolute (from the start of the file) and is the start of the next chunk.
        """
        data = _as_u8(block)
        n = len(data)
        if n == 0:
            return []
        cuts: list[int] = []
        if self._held is not None:
            cuts.append(self._held)
            self._held = None
        base, end = self._pos, self._pos + n
        mn, mx = self._params.min_size, self._params.max_size
        last = self._last_cut
        while True:
            # Positions before `base` were tested by earlier feeds (W is a function of data).
            lo, hard = max(last + mn, base), last + mx
            if lo >= end:
                break
            p = self._scan(data, base, last, lo, min(hard, end))
            if p >= 0:
                last = p
                cuts.append(p)
            elif hard <= end:
                last = hard
                if hard == end:
                    self._held = hard
                else:
                    cuts.append(hard)
            else:
                break
        self._last_cut = last
        keep = min(_CONTEXT, end)
        if n >= keep:
            self._tail = data[n - keep :].copy()
        else:
            self._tail = np.concatenate([self._tail, data])[-keep:]
        self._pos = end
        return cuts

    def _scan(self, data: np.ndarray, base: int, last: int, lo: int, hi: int) -> int:
        """First triggering position in ``[lo, hi)``, or -1; ``data`` starts at ``base``."""
        for q0 in range(lo, hi, _SCAN_BLOCK):
            q1 = min(q0 + _SCAN_BLOCK, hi)
            first = q0 - _CONTEXT
            if first >= base and first >= last:
                buf = data[first - base : q1 - base]
            else:
                buf = self._window_buffer(data, base, max(first, last), q0, q1)
            i = self._scanner.first_trigger(buf, _CONTEXT)
            if i >= 0:
                return first + i
        return -1

    def _window_buffer(
        self, data: np.ndarray, base: int, since: int, q0: int, q1: int
    ) -> np.ndarray:
        """Bytes ``[q0-31, q1)`` with zeros before ``since`` (the chunk start, as upstream's
        reset state) and the held tail for positions before ``base``."""
        first = q0 - _CONTEXT
        buf = np.zeros(q1 - first, dtype=np.uint8)
        tail_start = base - len(self._tail)
        a = max(since, tail_start)
        if a < base:
            buf[a - first : base - first] = self._tail[a - tail_start :]
        a = max(since, base)
        buf[a - first :] = data[a - base : q1 - base]
        return buf


def cut_points(data: bytes | bytearray | memoryview | np.ndarray, params: ChunkParams) -> list[int]:
    """All cut offsets of a whole file, excluding 0 and ``len(data)``.

    Returns ``[]`` when ``len(data) <= params.min_size``: such a file is never chunked.
    """
    return Xor32Chunker(params).feed(data)


def chunk_spans(size: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """``(offset, length)`` of each chunk of a ``size``-byte file cut at ``cuts``.

    ``cuts`` must increase strictly inside ``(0, size)``; a final cut equal to ``size`` is
    ignored (a cut at EOF makes no empty chunk). An empty file has no chunks.
    """
    bounds = [0, *cuts]
    if cuts and cuts[-1] == size:
        bounds.pop()
    for a, b in itertools.pairwise(bounds):
        if not a < b < size:
            raise FormatError("chunk list", f"cut {b} out of order or outside (0, {size})")
    if size <= 0:
        if size < 0 or len(bounds) > 1:
            raise FormatError("chunk list", f"invalid size {size} for cuts {list(cuts)!r}")
        return []
    bounds.append(size)
    return [(a, b - a) for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------------------------
# Upstream's test-data generator
# --------------------------------------------------------------------------------------------

_LCG_A = 6364136223846793005
_LCG_C = 1442695040888963407
_MASK64 = 2**64 - 1
_PRNG_BLOCK = 1 << 16  # cache-resident


@lru_cache(maxsize=2)
def _lcg_jumps(count: int) -> tuple[np.ndarray, np.ndarray]:
    """``P[i], Q[i]`` with ``state_{i+1} = P[i] * state_0 + Q[i] (mod 2^64)``, ``i < count``.

    Built by doubling: ``n + m`` steps are ``m`` steps followed by ``n`` steps, so
    ``P[n+m] = P[n] P[m]`` and ``Q[n+m] = P[n] Q[m] + Q[n]``. numpy ``uint64`` arithmetic wraps
    modulo ``2^64`` as C does.
    """
    p = np.array([_LCG_A], dtype=np.uint64)
    q = np.array([_LCG_C], dtype=np.uint64)
    while len(p) < count:
        pm, qm = np.uint64(int(p[-1])), np.uint64(int(q[-1]))
        p, q = np.concatenate([p, p * pm]), np.concatenate([q, p * qm + q])
    return p[:count], q[:count]


def upstream_prng_bytes(seed: int, n: int) -> np.ndarray:
    """The ``n`` bytes upstream's unit tests draw with ``Prng::InitSeed(seed)``, ``Next(256)``.

    ``cvmfs/util/prng.h``: ``state = a * state + c (mod 2^64)``, then
    ``(uint64)(double(state) * 256 / 2^64) % 256``. The LCG is advanced a block at a time with
    precomputed jumps; the double conversion rounds to nearest as C does, and the scalings by
    256 and ``2^-64`` are exact.
    """
    if n < 0:
        raise ValueError(f"negative length {n}")
    out = np.empty(n, dtype=np.uint8)
    p, q = _lcg_jumps(min(_PRNG_BLOCK, max(n, 1)))
    states = np.empty(len(p), dtype=np.uint64)
    scaled = np.empty(len(p), dtype=np.float64)
    whole = np.empty(len(p), dtype=np.uint64)
    state = seed & _MASK64
    for i in range(0, n, len(p)):
        m = min(len(p), n - i)
        np.multiply(p[:m], np.uint64(state), out=states[:m])
        np.add(states[:m], q[:m], out=states[:m])
        state = int(states[m - 1])
        # uint64 -> float64 rounds to nearest (as static_cast<double>); * 2^-56 is exact.
        np.multiply(states[:m], 256.0 / 2.0**64, out=scaled[:m])
        np.copyto(whole[:m], scaled[:m], casting="unsafe")  # truncation, as the C cast
        np.copyto(out[i : i + m], whole[:m], casting="unsafe")  # keeps the low byte: % 256
    return out
