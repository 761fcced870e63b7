"""Layer decoding: a damaged or cut-off gzip or zstd stream is a FormatError, whichever decoder
(ISA-L or zlib for gzip, zstandard) ran into it; the raw stream's own errors pass through."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from cvmfs_ml.errors import CvmfsMlError, FormatError
from cvmfs_ml.models.sources.decompress import decompressed
from cvmfs_ml.models.sources.unpack import TreeWriter


def _tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(3):
            data = os.urandom(100_000)
            info = tarfile.TarInfo(f"d/f{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _damaged(data: bytes) -> bytes:
    out = bytearray(data)
    for i in range(len(out) // 2, len(out) // 2 + 32):
        out[i] ^= 0x5A
    return bytes(out)


TAR = _tar()
CASES = {
    "gzip cut short": gzip.compress(TAR)[:-3000],
    "gzip damaged": _damaged(gzip.compress(TAR)),
    "gzip trailer wrong": gzip.compress(TAR)[:-8] + b"\0" * 8,
    "zstd cut short": zstandard.ZstdCompressor().compress(TAR)[:-3000],
    "zstd damaged": _damaged(zstandard.ZstdCompressor(write_checksum=True).compress(TAR)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_streams_are_format_errors(case: str, tmp_path: Path) -> None:
    blob = tmp_path / "layer"
    blob.write_bytes(CASES[case])
    writer = TreeWriter(tmp_path / "out", rootfs=True)
    # zstandard's reader ends a cut-off frame quietly; tar then finds its data cut short
    expected = "broken tar archive" if case == "zstd cut short" else "stream.*corrupt or cut off"
    with pytest.raises(FormatError, match=expected):
        writer.apply_blob(blob)


def test_whole_streams_decode_as_before(tmp_path: Path) -> None:
    for name, data in (("gz", gzip.compress(TAR)), ("zst", zstandard.compress(TAR))):
        blob = tmp_path / name
        blob.write_bytes(data)
        stats = TreeWriter(tmp_path / f"out-{name}", rootfs=True).apply_blob(blob)
        assert stats.files == 3 and stats.bytes == 300_000


class _Failing(io.RawIOBase):
    """A raw stream (a download, say) that fails after some bytes."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__()
        self._data, self._at, self._fail_at = data, 0, fail_at

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._at >= self._fail_at:
            raise ConnectionResetError("peer went away")
        n = min(len(buffer), self._fail_at - self._at)
        buffer[:n] = self._data[self._at : self._at + n]
        self._at += n
        return n


def test_the_raw_streams_own_errors_are_not_called_corruption() -> None:
    raw = io.BufferedReader(_Failing(gzip.compress(TAR), 50_000))
    with decompressed(raw) as stream, pytest.raises(ConnectionResetError):
        while stream.read(1 << 16):
            pass
    assert not issubclass(ConnectionResetError, CvmfsMlError)
