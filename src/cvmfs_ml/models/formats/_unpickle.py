"""A pickle reader that never runs code: every global it meets becomes an inert stub.

PyTorch checkpoints and TorchScript archives keep their structure in ``data.pkl``. Unpickling
normally imports and calls whatever the stream names, so a hostile checkpoint runs code. Here
``find_class`` returns only (a) stub classes that record their arguments and state, (b) a few
side-effect-free builtins (``dict``, ``OrderedDict``, ``set``...), and (c) recorders for
``torch._utils._rebuild_tensor_v2`` and friends that capture a tensor's storage, shape and dtype.
``persistent_load`` turns ``("storage", type, key, location, numel)`` into a :class:`StorageRef`
(torch ``serialization.py``, ``_save`` / ``persistent_id``). Nothing outside this module is
imported or called.

:func:`scan_globals` is the cheaper, looser tool for arbitrary pickles: a ``pickletools`` walk
that lists the globals a pickle would import, without building anything.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cvmfs_ml.models.formats.base import numel

__all__ = [
    "StorageRef",
    "Stub",
    "TensorRef",
    "iter_tensors",
    "restricted_loads",
    "scan_globals",
    "storage_dtype",
]


@dataclass(frozen=True)
class StorageRef:
    """A tensor storage record (``data/<key>`` in the zip)."""

    key: str
    dtype: str
    location: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle rebuilds it: a view ``(offset, shape, stride)`` of a storage."""

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Elements (:func:`~cvmfs_ml.models.formats.base.numel`: a shape no real tensor has is
        a :class:`~cvmfs_ml.models.formats.base.ModelFormatError`)."""
        return numel(self.shape, "data.pkl")


class Stub:
    """An instance of a global we refuse to import: it keeps its arguments and state only."""

    qualname = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    list: list[Any]

    # NEWOBJ calls only __new__ (REDUCE calls both), so the fields are set here.
    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        self = super().__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = {}
        self.list = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


_STUB_CLASSES: dict[str, type[Stub]] = {}


def _stub_class(module: str, name: str) -> type[Stub]:
    qualname = f"{module}.{name}"
    cls = _STUB_CLASSES.get(qualname)
    if cls is None:
        cls = type(name, (Stub,), {"qualname": qualname, "__module__": __name__})
        _STUB_CLASSES[qualname] = cls
    return cls


# torch storage class -> dtype (``torch/storage.py`` ``_pickle_storage_type``).
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "UntypedStorage": "uint8",
}  # fmt: skip


def storage_dtype(class_name: str) -> str:
    """dtype of a torch storage class name (``"FloatStorage"`` -> ``"float32"``)."""
    if class_name in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[class_name]
    return class_name.removesuffix("Storage").lower() or "unknown"


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _DType:
    name: str


def _ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple | list) and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    return ()


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None) -> Any:
    ref = storage if isinstance(storage, StorageRef) else None
    return TensorRef(
        ref,
        offset if isinstance(offset, int) else 0,
        _ints(size),
        _ints(stride),
        dtype or (ref.dtype if ref else "unknown"),
    )


def _rebuild_tensor(storage: Any = None, offset: Any = 0, size: Any = (), stride: Any = (),
                    *rest: Any) -> Any:  # fmt: skip
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any = None, offset: Any = 0, size: Any = (), stride: Any = (),
                       _grad: Any = None, _hooks: Any = None, dtype: Any = None,
                       *rest: Any) -> Any:  # fmt: skip
    return _tensor(storage, offset, size, stride, dtype.name if isinstance(dtype, _DType) else None)


def _first(data: Any = None, *rest: Any) -> Any:
    return data


def _from_type_v2(func: Any = None, _new_type: Any = None, args: Any = (), _state: Any = None
                  ) -> Any:  # fmt: skip
    if func in _CALLABLE_RECORDERS and isinstance(args, tuple):
        return func(*args)
    return _stub_class("torch._tensor", "_rebuild_from_type_v2")(func, args)


def _codecs_encode(text: Any = "", encoding: Any = "latin1", *rest: Any) -> Any:
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return b""


_RECORDERS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _first,
    ("torch._utils", "_rebuild_parameter_with_state"): _first,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type_v2,
    ("_codecs", "encode"): _codecs_encode,
}
_CALLABLE_RECORDERS = frozenset(_RECORDERS.values())

# Builtins that build plain containers and run nothing else.
_SAFE: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
}

_TORCH_DTYPES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long",
    "int32", "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32",
    "uint64",
}  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _RECORDERS:
            return _RECORDERS[key]
        if key in _SAFE:
            return _SAFE[key]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(storage_dtype(name))
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(name)
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            _, stype, key, location, count = pid[:5]
            dtype = stype.dtype if isinstance(stype, _StorageType) else "unknown"
            ref = StorageRef(str(key), dtype, str(location), count if isinstance(count, int) else 0)
            self.storages.setdefault(ref.key, ref)
            return ref
        return _stub_class("persistent", "id")(pid)


def restricted_loads(data: bytes) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data`` with stubs for every global; returns (object, storages by key).

    Raises ``pickle.UnpicklingError`` (or ``ValueError``/``EOFError``/...) on a malformed stream;
    callers translate that into their format error.
    """
    unpickler = _RestrictedUnpickler(data)
    obj = unpickler.load()
    return obj, unpickler.storages


def iter_tensors(obj: Any, max_nodes: int = 1_000_000) -> Iterator[tuple[str, TensorRef]]:
    """``(dotted path, tensor)`` for every tensor reachable from ``obj`` (each object once)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    visited = 0
    while stack and visited < max_nodes:
        path, value, depth = stack.pop()
        visited += 1
        if isinstance(value, TensorRef):
            yield path, value
            continue
        if depth > 64 or isinstance(value, str | bytes | int | float | bool) or value is None:
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        children: list[tuple[str, Any]] = []
        if isinstance(value, dict):
            children = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list | tuple | set | frozenset):
            children = [(str(i), v) for i, v in enumerate(value)]
        elif isinstance(value, Stub):
            if isinstance(value.state, dict):
                children += [(str(k), v) for k, v in value.state.items()]
            elif value.state is not None:
                children.append(("state", value.state))
            children += [(str(k), v) for k, v in value.items.items()]
            children += [(str(i), v) for i, v in enumerate(value.list)]
            children += [(f"arg{i}", v) for i, v in enumerate(value.args)]
        for name, child in reversed(children):
            stack.append((f"{path}.{name}" if path else name, child, depth + 1))


_GLOBAL_OPS = frozenset({"GLOBAL", "INST", "STACK_GLOBAL"})
_STRING_OPS = frozenset({
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
    "SHORT_BINSTRING",
})  # fmt: skip


def scan_globals(stream: Any, limit: int = 1000) -> tuple[list[str], str | None]:
    """The ``module.name`` globals a pickle stream imports, in order of first use.

    Walks opcodes with ``pickletools.genops`` (nothing is built). Returns ``(globals, error)``;
    ``error`` says why the walk stopped early (a joblib array payload, a truncated stream, the
    reader's byte budget), in which case the list covers what was read.
    """
    found: list[str] = []
    recent: list[str] = []  # strings pushed since the last other stack operation
    memo: dict[int, str] = {}
    memo_count = 0  # MEMOIZE numbers every memoised object, strings or not
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in _STRING_OPS and isinstance(arg, str | bytes):
                recent.append(arg.decode("latin1") if isinstance(arg, bytes) else arg)
            elif name == "MEMOIZE":
                if recent:
                    memo[memo_count] = recent[-1]
                memo_count += 1
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                if recent and isinstance(arg, int):
                    memo[arg] = recent[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int) and arg in memo:
                recent.append(memo[arg])
            elif name in _GLOBAL_OPS:
                if name == "STACK_GLOBAL":
                    qual = ".".join(recent[-2:]) if len(recent) >= 2 else "?"
                else:
                    qual = str(arg).replace(" ", ".")
                recent = []
                if qual not in found:
                    found.append(qual)
                    if len(found) >= limit:
                        return found, f"stopped after {limit} globals"
            elif name == "STOP":
                return found, None
            elif name not in ("FRAME", "PROTO"):  # framing does not touch the stack
                recent = []
    except Exception as exc:  # any malformed or truncated stream just ends the scan
        return found, f"{type(exc).__name__}: {exc}"
    return found, "stream ended without STOP"
