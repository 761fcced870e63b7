"""Zip containers (PyTorch, TorchScript, Keras v3) read in place, central directory first.

``zipfile`` reads only the central directory at the end of the archive; members are then read
one by one. A stored (uncompressed) member is exposed as a :class:`.base.SubFile` window so h5py
can seek inside it without extracting it (``APPNOTE.TXT`` 4.3.7: local file header).
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any

from cvmfs_ml.models.formats.base import ZIP_ERRORS, ModelFormatError, ReadableFile, SubFile

__all__ = ["member_file", "open_zip", "read_member"]


def open_zip(f: ReadableFile, what: str) -> zipfile.ZipFile:
    """The archive in ``f``, or :class:`ModelFormatError` if its directory does not parse."""
    try:
        f.seek(0)
        return zipfile.ZipFile(f)  # type: ignore[arg-type]
    except ZIP_ERRORS as exc:
        raise ModelFormatError(what, f"bad zip archive: {exc}") from None


def read_member(z: zipfile.ZipFile, name: str, what: str, limit: int) -> bytes:
    """The bytes of member ``name`` (at most ``limit``, else :class:`ModelFormatError`)."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise ModelFormatError(what, f"zip member {name!r} is missing") from None
    if info.file_size > limit:
        raise ModelFormatError(
            what, f"zip member {name!r} is {info.file_size} bytes, over the {limit}-byte limit"
        )
    try:
        return z.read(info)
    except ZIP_ERRORS as exc:
        raise ModelFormatError(what, f"cannot read zip member {name!r}: {exc}") from None


def member_file(z: zipfile.ZipFile, f: ReadableFile, name: str, what: str) -> Any:
    """A seekable file over member ``name``: a window if stored, else ``ZipFile.open``."""
    info = z.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ModelFormatError(what, f"zip member {name!r}: bad local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        return SubFile(f, start, info.file_size)
    try:
        return z.open(info)
    except ZIP_ERRORS as exc:
        raise ModelFormatError(what, f"cannot open zip member {name!r}: {exc}") from None
