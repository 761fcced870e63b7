"""PyTorch checkpoints (``torch.save``) and TorchScript archives (``torch.jit.save``).

Both are zip archives with every record under one top directory (``archive/`` or the file's
stem): ``data.pkl`` (the pickled object; tensors point at storages by persistent id),
``data/<key>`` (raw storage bytes), ``version`` and ``byteorder``. TorchScript adds ``code/``
(the compiled Python source), ``constants.pkl`` and ``extra/``. Layout per
``torch/serialization.py`` (``_save``) and ``caffe2/serialize/inline_container.h``.

``data.pkl`` is read with :mod:`._unpickle`'s restricted unpickler, which never imports or calls
anything it names, to count tensors and parameters; the storages themselves are never read.
The pre-1.6 "legacy" format (a bare pickle stream starting with torch's magic number) is
recognised and flagged unsafe, but its contents are not parsed. Loading any of these with
``torch.load(weights_only=False)`` runs pickle, so every description is marked ``unsafe``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any

from cvmfs_ml.models.formats._unpickle import (
    StorageRef,
    Stub,
    TensorRef,
    iter_tensors,
    restricted_loads,
)
from cvmfs_ml.models.formats._zip import open_zip, read_member
from cvmfs_ml.models.formats.base import (
    ZIP_ERRORS,
    ModelDescription,
    ModelFormatError,
    Probe,
    ReadableFile,
    Source,
    TensorInfo,
    add_dtype,
)

__all__ = ["FORMATS", "LEGACY_MAGIC", "describe", "detect"]

FORMATS = ("pytorch", "torchscript")
#: ``pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)``: torch's legacy ``MAGIC_NUMBER``.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
#: ``data.pkl`` larger than this is listed, not unpickled (a state dict's is kilobytes).
MAX_PICKLE = 64 << 20
_UNSAFE = "loading runs pickle (torch.load weights_only=False executes arbitrary code)"


def _prefix(names: list[str], record: str) -> str | None:
    for name in names:
        head, _, tail = name.partition("/")
        if tail == record and head:
            return head
    return None


def detect(probe: Probe) -> str | None:
    """``"torchscript"`` / ``"pytorch"`` from the zip layout, or the legacy magic pickle."""
    names = probe.zip_names
    if names is None:
        return "pytorch" if probe.head.startswith(LEGACY_MAGIC) else None
    prefix = _prefix(names, "data.pkl") or _prefix(names, "constants.pkl")
    if prefix is None:
        return None
    if f"{prefix}/constants.pkl" in names and any(n.startswith(f"{prefix}/code/") for n in names):
        return "torchscript"
    return "pytorch" if f"{prefix}/data.pkl" in names else None


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe a PyTorch checkpoint or TorchScript archive (``data.pkl`` read with stubs).

    A local file is described by a memory-capped child process
    (:mod:`~cvmfs_ml.models.formats.isolated`): a few kB of hostile pickle can make the C
    unpickler take gigabytes, or crash the process. Other files (open file objects, remote
    openers) are described here.
    """
    if source.opener is open and os.path.isfile(source.path):
        from cvmfs_ml.models.formats.isolated import describe_in_child

        return describe_in_child(source.path, "pytorch")
    return describe_here(f, source)


def describe_here(f: ReadableFile, source: Source) -> ModelDescription:
    """:func:`describe` in this process (the child of :mod:`.isolated` calls this)."""
    what = source.path
    f.seek(0)
    if f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC:
        return ModelDescription(
            format="pytorch",
            framework="pytorch",
            metadata={"legacy_format": True},
            unsafe=True,
            warnings=[_UNSAFE, "legacy (pre-1.6) torch.save format: contents not listed"],
        )
    with open_zip(f, what) as z:
        names = z.namelist()
        prefix = _prefix(names, "data.pkl") or _prefix(names, "constants.pkl")
        if prefix is None:
            raise ModelFormatError(what, "zip archive has no <dir>/data.pkl record")
        scripted = f"{prefix}/constants.pkl" in names and any(
            n.startswith(f"{prefix}/code/") for n in names
        )
        desc = ModelDescription(
            format="torchscript" if scripted else "pytorch", framework="pytorch", unsafe=True
        )
        desc.warnings.append(_UNSAFE)
        meta: dict[str, Any] = {"records": len(names), "archive_name": prefix}
        for record, key in (
            ("version", "version"),
            ("byteorder", "byteorder"),
            (".format_version", "format_version"),
            (".data/version", "data_version"),
        ):
            if f"{prefix}/{record}" in names:
                raw = read_member(z, f"{prefix}/{record}", what, 4096)
                meta[key] = raw.decode("utf-8", errors="replace").strip()
        desc.metadata = meta
        storage_sizes = {
            n[len(prefix) + 6 :]: z.getinfo(n).file_size
            for n in names
            if n.startswith(f"{prefix}/data/")
        }
        if f"{prefix}/data.pkl" in names:
            root = _load_pickle(z, f"{prefix}/data.pkl", what, desc)
            if root is not None:
                _count_tensors(root, storage_sizes, desc)
                _describe_root(root, desc)
        if scripted:
            _describe_script(z, names, prefix, desc, what)
    return desc


def _load_pickle(z: zipfile.ZipFile, name: str, what: str, desc: ModelDescription) -> Any:
    size = z.getinfo(name).file_size
    if size > MAX_PICKLE:
        desc.warnings.append(f"{name} is {size} bytes: not parsed, tensors not counted")
        return None
    data = read_member(z, name, what, MAX_PICKLE)
    try:
        root, _storages = restricted_loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError, *ZIP_ERRORS) as exc:  # fmt: skip
        raise ModelFormatError(what, f"{name} is not a valid pickle: {exc}") from None
    return root


def _count_tensors(root: Any, storage_sizes: dict[str, int], desc: ModelDescription) -> None:
    seen: set[tuple[Any, ...]] = set()
    params = 0
    by_key: dict[str, int] = {}
    missing: set[str] = set()
    for path, t in iter_tensors(root):
        key = (t.storage.key if t.storage else id(t), t.offset, t.shape, t.stride)
        if key in seen:
            continue
        seen.add(key)
        params += t.numel
        add_dtype(by_key, path.partition(".")[0], t.numel)
        add_dtype(desc.dtypes, t.dtype, t.numel)
        desc.weights.append(TensorInfo(path, t.dtype, t.shape))
        if isinstance(t.storage, StorageRef) and t.storage.key not in storage_sizes:
            missing.add(t.storage.key)
    desc.parameters = params
    desc.tensors = len(seen)
    if isinstance(root, dict) and len(by_key) > 1 and len(by_key) < len(seen):
        # A training checkpoint ({"model": ..., "optimizer": ...}): say where elements are.
        desc.metadata["parameters_by_key"] = by_key
    if missing:
        desc.warnings.append(f"storage records missing from the archive: {sorted(missing)[:10]}")


def _describe_root(root: Any, desc: ModelDescription) -> None:
    if isinstance(root, dict):
        keys = [str(k) for k in list(root)[:50]]
        desc.metadata["top_level_keys"] = keys
        tensors_at_top = sum(isinstance(v, TensorRef) for v in root.values())
        desc.metadata["state_dict"] = bool(root) and tensors_at_top == len(root)
    elif isinstance(root, Stub):
        desc.metadata["root_class"] = root.qualname


_FORWARD = re.compile(r"def forward\((.*?)\)\s*->\s*(.+?):\n", re.DOTALL)


def _split_params(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]


def _describe_script(
    z: zipfile.ZipFile, names: list[str], prefix: str, desc: ModelDescription, what: str
) -> None:
    code = [n for n in names if n.startswith(f"{prefix}/code/") and n.endswith(".py")]
    desc.metadata["code_files"] = len(code)
    extra = [n[len(prefix) + 7 :] for n in names if n.startswith(f"{prefix}/extra/")]
    if extra:
        desc.metadata["extra_files"] = extra
    root_class = desc.metadata.get("root_class")
    if not isinstance(root_class, str) or not root_class.startswith("__torch__"):
        return
    module, _, cls = root_class.rpartition(".")
    path = f"{prefix}/code/{module.replace('.', '/')}.py"
    if path not in names or z.getinfo(path).file_size > (1 << 20):
        return
    text = read_member(z, path, what, 1 << 20).decode("utf-8", errors="replace")
    start = text.find(f"class {cls}(")
    if start < 0:
        return
    nxt = text.find("\nclass ", start + 1)
    match = _FORWARD.search(text[start : nxt if nxt > 0 else len(text)])
    if not match:
        return
    for param in _split_params(match.group(1))[1:]:  # drop self
        name, _, annotation = param.partition(":")
        annotation = annotation.partition("=")[0]  # drop a default value
        desc.inputs.append(TensorInfo(name.strip(), annotation.strip() or "Any", ()))
    desc.outputs.append(TensorInfo("output", match.group(2).strip(), ()))
