"""Shared helpers for the format tests: a read-counting file and protobuf message builders."""

from __future__ import annotations

import io
import os
from typing import Any


class CountingFile(io.RawIOBase):
    """A file wrapper that counts bytes read, to prove a parser reads headers only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.name = os.fspath(path)
        self.bytes_read = 0
        self.reads = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, size: int = -1, /) -> bytes:
        data = self._f.read(size)
        self.bytes_read += len(data)
        self.reads += 1
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self.bytes_read += n
        self.reads += 1
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


_TYPES = {"int32": 5, "int64": 3, "bool": 8, "string": 9, "bytes": 12, "enum_as_int": 5}
"""``FieldDescriptorProto.Type`` numbers of the scalar types the tests use."""


def build_messages(
    package: str, messages: dict[str, list[tuple[str, int, str, bool]]]
) -> dict[str, Any]:
    """Message classes from ``{name: [(field, number, type, repeated)]}``.

    ``type`` is a scalar name from ``_TYPES`` or another message's name. Encoding is done by the
    protobuf runtime, independently of the parsers under test; map fields are declared as
    repeated ``*Entry`` messages with ``key = 1`` and ``value = 2``, which is their wire form.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package)
    proto.syntax = "proto3"
    for name, fields in messages.items():
        msg = proto.message_type.add(name=name)
        for field_name, number, ftype, repeated in fields:
            fld = msg.field.add(name=field_name, number=number)
            fld.label = (
                descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                if repeated
                else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            )
            if ftype in _TYPES:
                fld.type = _TYPES[ftype]
            else:
                fld.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                fld.type_name = f".{package}.{ftype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
        for name in messages
    }
