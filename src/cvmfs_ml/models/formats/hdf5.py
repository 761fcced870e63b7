"""Keras models (v3 ``.keras`` zip, legacy HDF5 ``.h5``) and plain HDF5 files.

A Keras v3 file is a zip with ``config.json`` (the model's architecture), ``metadata.json``
(``keras_version``, ``date_saved``) and ``model.weights.h5`` (``keras/src/saving/saving_lib.py``).
A legacy Keras file is HDF5 whose root carries ``keras_version``, ``backend`` and ``model_config``
attributes, weights under ``model_weights/`` (``keras/src/legacy/saving/legacy_h5_format.py``).
HDF5 files start with ``\\x89HDF\\r\\n\\x1a\\n`` at offset 0 or, after a user block, at 512, 1024,
2048... (HDF5 File Format Specification, "Superblock").

h5py reads lazily through the file object, so counting weights walks object headers and dataset
shapes only. A stored ``model.weights.h5`` is opened in place inside the zip. Without h5py the
file is still detected (``"hdf5"``) and described minimally.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.models.formats._zip import member_file, open_zip, read_member
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

__all__ = ["FORMATS", "SIGNATURE", "describe", "detect", "find_superblock"]

FORMATS = ("keras", "hdf5")
_H5_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, RuntimeError, TypeError, OverflowError, *ZIP_ERRORS,
)  # fmt: skip
"""What h5py raises on a damaged or hostile file: it turns the HDF5 library's errors into
these built-in types, from any call (opening, reading attributes, visiting groups), and a
weights file inside a Keras zip adds the zip's own (read through :func:`member_file`)."""
SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SUPERBLOCK_OFFSETS = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_KERAS_ATTRS = ("keras_version", "model_config", "layer_names")
_MAX_JSON = 64 << 20
_MAX_LISTED = 100_000
_MAX_DEFLATED = 256 << 20


def find_superblock(probe: Probe) -> int | None:
    """Offset of the HDF5 signature (0 or a power-of-two user block size), or None."""
    for offset in _SUPERBLOCK_OFFSETS:
        if offset + len(SIGNATURE) > probe.size:
            break
        if probe.read_at(offset, len(SIGNATURE)) == SIGNATURE:
            return offset
    return None


def _is_keras_zip(names: list[str]) -> bool:
    return "config.json" in names and ("metadata.json" in names or "model.weights.h5" in names)


def detect(probe: Probe) -> str | None:
    """``"keras"`` for a v3 zip or an HDF5 file with Keras root attributes, ``"hdf5"`` else."""
    names = probe.zip_names
    if names is not None:
        return "keras" if _is_keras_zip(names) else None
    if find_superblock(probe) is None:
        return None
    try:
        import h5py
    except ImportError:
        return "hdf5"
    try:
        probe.f.seek(0)
        with h5py.File(probe.f, "r") as h5:
            return "keras" if any(a in h5.attrs for a in _KERAS_ATTRS) else "hdf5"
    except _H5_ERRORS:
        return None


def describe(f: ReadableFile, source: Source) -> ModelDescription:
    """Describe a Keras v3 zip, a legacy Keras HDF5 file, or a plain HDF5 file.

    A local file is described by a memory-capped child process
    (:mod:`~cvmfs_ml.models.formats.isolated`): h5py's C library can be made to allocate
    gigabytes by a few hostile bytes (a Keras v3 zip holds an HDF5 file too). Other files (open
    file objects, remote openers) are described here.
    """
    if source.opener is open and os.path.isfile(source.path):
        from cvmfs_ml.models.formats.isolated import describe_in_child

        return describe_in_child(source.path, "hdf5")
    return describe_here(f, source)


def describe_here(f: ReadableFile, source: Source) -> ModelDescription:
    """:func:`describe` in this process (the child of :mod:`.isolated` calls this)."""
    f.seek(0)
    if f.read(4) in (b"PK\x03\x04", b"PK\x05\x06"):
        return _describe_keras_zip(f, source)
    try:
        return _describe_h5(f, source)
    except ModelFormatError:
        raise  # a ValueError too, and already says what is wrong
    except _H5_ERRORS as exc:
        raise ModelFormatError(source.path, f"bad HDF5 file: {exc}") from None


def _json_member(z: Any, name: str, what: str) -> Any:
    try:
        return jsontext.loads(read_member(z, name, what, _MAX_JSON))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(what, f"{name} is not valid JSON: {exc}") from None


def _describe_keras_zip(f: ReadableFile, source: Source) -> ModelDescription:
    what = source.path
    desc = ModelDescription(format="keras", framework="keras")
    with open_zip(f, what) as z:
        names = z.namelist()
        if not _is_keras_zip(names):
            raise ModelFormatError(what, "zip archive has no Keras config.json/metadata.json")
        config = _json_member(z, "config.json", what)
        meta = _json_member(z, "metadata.json", what) if "metadata.json" in names else {}
        if not isinstance(config, dict) or not isinstance(meta, dict):
            raise ModelFormatError(what, "Keras config.json/metadata.json must be JSON objects")
        desc.metadata = {
            "keras_version": meta.get("keras_version"),
            "date_saved": meta.get("date_saved"),
            **_config_summary(config),
        }
        desc.inputs = _input_layers(config)
        desc.metadata["assets"] = [n for n in names if n.startswith("assets/")][:100]
        info = z.getinfo("model.weights.h5") if "model.weights.h5" in names else None
        if info is not None and (
            info.compress_type == zipfile.ZIP_STORED or info.file_size <= _MAX_DEFLATED
        ):
            with member_file(z, f, "model.weights.h5", what) as member:
                _count_h5(member, f"{what}!model.weights.h5", desc, keras=True)
        elif info is not None:
            # h5py seeks backwards, which re-inflates a compressed member from its start.
            desc.warnings.append("model.weights.h5 is compressed and large: weights not counted")
        else:
            desc.warnings.append("no model.weights.h5 in the archive")
    return desc


def _describe_h5(f: ReadableFile, source: Source) -> ModelDescription:
    what = source.path
    try:
        import h5py
    except ImportError:
        return ModelDescription(format="hdf5", warnings=["h5py is not installed: not inspected"])
    f.seek(0)
    with h5py.File(f, "r") as h5:
        attrs = {k: _attr(h5.attrs[k]) for k in h5.attrs if k in (*_KERAS_ATTRS, "backend")}
        if not any(a in attrs for a in _KERAS_ATTRS):
            desc = ModelDescription(format="hdf5")
            _walk(h5, desc, keras=False)
            return desc
        desc = ModelDescription(format="keras", framework="keras")
        desc.metadata = {
            "keras_version": attrs.get("keras_version"),
            "backend": attrs.get("backend"),
            "legacy_h5": True,
        }
        config = attrs.get("model_config")
        if isinstance(config, str):
            try:
                parsed = jsontext.loads(config)
            except json.JSONDecodeError as exc:
                raise ModelFormatError(what, f"model_config is not valid JSON: {exc}") from None
            if isinstance(parsed, dict):
                desc.metadata.update(_config_summary(parsed))
                desc.inputs = _input_layers(parsed)
        else:
            desc.metadata["weights_only"] = True
        root = h5.get("model_weights", h5)
        _walk(root, desc, keras=True)
    return desc


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _count_h5(f: Any, what: str, desc: ModelDescription, *, keras: bool) -> None:
    try:
        import h5py
    except ImportError:
        desc.warnings.append("h5py is not installed: weights not counted")
        return
    try:
        with h5py.File(f, "r") as h5:
            _walk(h5, desc, keras=keras)
    except ModelFormatError:
        raise
    except _H5_ERRORS as exc:
        raise ModelFormatError(what, f"bad HDF5 weights file: {exc}") from None


def _walk(group: Any, desc: ModelDescription, *, keras: bool) -> None:
    """Count datasets (Keras: weights only, not optimizer state) from their shapes."""
    import h5py

    params = count = 0

    def visit(name: str, obj: Any) -> None:
        nonlocal params, count
        if not isinstance(obj, h5py.Dataset):
            return
        if keras and name.split("/")[0] in ("optimizer", "optimizer_weights"):
            return
        n = int(obj.size or 0)
        dtype = str(obj.dtype)
        params += n
        count += 1
        add_dtype(desc.dtypes, dtype, n)
        if count <= _MAX_LISTED:
            desc.weights.append(TensorInfo(name, dtype, tuple(int(d) for d in obj.shape or ())))

    group.visititems(visit)
    desc.tensors = count
    if keras:
        desc.parameters = params
    else:
        # A plain HDF5 file may hold data, not weights: report elements, not "parameters".
        desc.metadata["elements"] = params
    if count > _MAX_LISTED:
        desc.warnings.append(f"{count} datasets: only the first {_MAX_LISTED} are listed")


def _config_summary(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    layers = inner.get("layers") if isinstance(inner, dict) else None
    return {
        "class_name": config.get("class_name"),
        "model_name": inner.get("name") if isinstance(inner, dict) else None,
        "layers": len(layers) if isinstance(layers, list) else None,
    }


def _input_layers(config: dict[str, Any]) -> list[TensorInfo]:
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else None
    out: list[TensorInfo] = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or layer.get("class_name") != "InputLayer":
            continue
        cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape") or []
        dtype = cfg.get("dtype")
        if isinstance(dtype, dict):  # Keras 3 DTypePolicy objects
            dtype = (dtype.get("config") or {}).get("name")
        out.append(
            TensorInfo(
                str(cfg.get("name") or layer.get("name") or "input"),
                str(dtype or "float32"),
                tuple(d if isinstance(d, int | str) else None for d in shape)
                if isinstance(shape, list)
                else (),
            )
        )
    return out
