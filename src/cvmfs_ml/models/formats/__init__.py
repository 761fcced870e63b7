"""Model formats: recognise a model file by its bytes and describe it from its header.

One small module per format, each with ``detect(probe)`` (magic bytes or layout; the file name
only breaks ties) and ``describe(file, source)`` (header-only: a 10 GB model is never loaded).
This package ties them together::

    detect("model.onnx")                 -> "onnx"
    describe("model.onnx")               -> ModelDescription(format="onnx", parameters=..., ...)
    describe("saved_model_dir/")         -> a SavedModel or .mlpackage directory
    describe_folder("snapshot/")         -> {"model.safetensors": ..., "onnx/model.onnx": ...}

Everything reads through ``opener(path, "rb")`` (``open`` by default, or ``fs.open`` of an
fsspec filesystem), so a file in a remote repository is described with a few range reads.
Malformed headers raise :class:`ModelFormatError` naming the file and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

from cvmfs_ml.models.formats import (
    coreml,
    gguf_format,
    hdf5,
    onnx_format,
    pickle_format,
    pmml,
    pytorch,
    safetensors_format,
    savedmodel,
    tflite,
    xgboost_format,
)
from cvmfs_ml.models.formats.base import (
    DirSource,
    ModelDescription,
    ModelFormatError,
    Opener,
    Probe,
    ReadableFile,
    Source,
    TensorInfo,
    suffix_of,
)

__all__ = [
    "FORMATS",
    "MAX_DESCRIBED",
    "MAX_ISOLATED",
    "ModelDescription",
    "ModelFormatError",
    "ReadableFile",
    "TensorInfo",
    "describe",
    "describe_folder",
    "detect",
]

#: Every format name :func:`detect` can return.
FORMATS = (
    "onnx", "safetensors", "pytorch", "torchscript", "gguf", "keras", "hdf5", "tf-savedmodel",
    "tflite", "xgboost", "pmml", "coreml", "pickle", "joblib",
)  # fmt: skip

#: Model files :func:`describe_folder` describes at most; the rest are left out (``left_out``).
#: A folder of 10,000 tiny model files of a stranger's upload is not worth describing, and each
#: description goes into ``model.json``; the largest real models have a few hundred shards.
MAX_DESCRIBED = 1000
#: Of those, files described in a child process (:mod:`.isolated`: PyTorch, HDF5, Keras), which
#: takes about 0.4 s each on a loaded machine; real checkpoints have at most about 100 shards.
MAX_ISOLATED = 128
_ISOLATED = frozenset({"pytorch", "torchscript", "keras", "hdf5"})

# Cheap magic-number checks first; the protobuf family (no magic) last.
_FILE_DETECTORS: tuple[Callable[[Probe], str | None], ...] = (
    gguf_format.detect,
    tflite.detect,
    safetensors_format.detect,
    pytorch.detect,
    pickle_format.detect,
    pmml.detect,
    xgboost_format.detect,
    hdf5.detect,
    onnx_format.detect,
    coreml.detect,
    savedmodel.detect,
)

_DESCRIBERS: dict[str, Callable[[Any, Source], ModelDescription]] = {
    "onnx": onnx_format.describe,
    "safetensors": safetensors_format.describe,
    "pytorch": pytorch.describe,
    "torchscript": pytorch.describe,
    "gguf": gguf_format.describe,
    "keras": hdf5.describe,
    "hdf5": hdf5.describe,
    "tf-savedmodel": savedmodel.describe,
    "tflite": tflite.describe,
    "xgboost": xgboost_format.describe,
    "pmml": pmml.describe,
    "coreml": coreml.describe,
    "pickle": pickle_format.describe,
    "joblib": pickle_format.describe,
}


# Used only to explain why a file that matched no format failed (never to detect one).
_BY_SUFFIX = {
    ".onnx": "onnx", ".safetensors": "safetensors", ".gguf": "gguf", ".tflite": "tflite",
    ".pt": "pytorch", ".pth": "pytorch", ".keras": "keras", ".h5": "hdf5", ".hdf5": "hdf5",
    ".mlmodel": "coreml", ".pmml": "pmml", ".ubj": "xgboost", ".pkl": "pickle",
    ".pickle": "pickle", ".joblib": "joblib",
}  # fmt: skip


def _is_file_object(value: Any) -> bool:
    return hasattr(value, "read") and hasattr(value, "seek")


def _detect_file(f: ReadableFile, name: str) -> str | None:
    pos = f.tell()
    try:
        probe = Probe(f, name)
        if probe.size == 0:
            return None
        for detector in _FILE_DETECTORS:
            found = detector(probe)
            if found is not None:
                return found
        return None
    finally:
        f.seek(pos)


def _detect_dir(source: DirSource) -> str | None:
    return savedmodel.detect_dir(source) or coreml.detect_dir(source)


def _is_dir(path: str, opener: Opener) -> bool:
    if opener is open:
        return os.path.isdir(path)
    try:
        with opener(path, "rb"):
            return False
    except IsADirectoryError:
        return True
    except OSError:
        return False


def detect(
    path_or_file: str | os.PathLike[str] | ReadableFile,
    *,
    name: str | None = None,
    opener: Opener = open,
) -> str | None:
    """The format of a file or directory (one of :data:`FORMATS`), or None if not a model.

    ``path_or_file`` is a path (opened with ``opener``) or an open binary file, whose position
    is restored; ``name`` is the file name used to break ties (defaults to the path).
    """
    if _is_file_object(path_or_file):
        f: Any = path_or_file
        return _detect_file(f, name or str(getattr(f, "name", "")))
    path = os.fspath(path_or_file)  # type: ignore[arg-type]
    if _is_dir(path, opener):
        return _detect_dir(DirSource(path, opener))
    with opener(path, "rb") as f:
        return _detect_file(f, name or path)


def describe(
    path: str | os.PathLike[str] | ReadableFile,
    opener: Opener = open,
    *,
    name: str | None = None,
) -> ModelDescription:
    """Describe a model file or a model directory (SavedModel, ``.mlpackage``) from headers.

    Raises :class:`ModelFormatError` when the file is not a recognised model format or its
    header is malformed. A folder of model files (a Hugging Face snapshot) is not a format:
    use :func:`describe_folder`.
    """
    if _is_file_object(path):
        f: Any = path
        display = name or str(getattr(f, "name", "<file>"))
        return _describe_file(f, Source(display), display)
    text = os.fspath(path)  # type: ignore[arg-type]
    if _is_dir(text, opener):
        return _describe_dir(DirSource(text, opener))
    with opener(text, "rb") as f:
        return _describe_file(f, Source(text, opener), name or text)


def _describe_file(f: ReadableFile, source: Source, name: str) -> ModelDescription:
    fmt = _detect_file(f, name)
    if fmt is not None:
        return _DESCRIBERS[fmt](f, source)
    suffix = suffix_of(name)
    guess = _BY_SUFFIX.get(suffix)
    if guess is None:
        raise ModelFormatError(source.path, "not a recognised model format")
    # The bytes matched no format, but the name says which one was meant: parse the file as
    # that format so the error says what is wrong with it (bad magic, truncated header...).
    desc = _DESCRIBERS[guess](f, source)
    desc.warnings.append(f"described as {guess} because of its {suffix!r} extension only")
    return desc


def _describe_dir(source: DirSource) -> ModelDescription:
    if savedmodel.detect_dir(source):
        listdir = os.listdir if source.opener is open else None
        return savedmodel.describe_dir(source, listdir)
    if coreml.detect_dir(source):
        return coreml.describe_dir(source)
    raise ModelFormatError(
        source.path,
        "directory is not a model format (SavedModel or .mlpackage); "
        "use describe_folder() for a folder of model files",
    )


def describe_folder(
    root: str | os.PathLike[str], *, strict: bool = True, left_out: list[str] | None = None
) -> dict[str, ModelDescription]:
    """Every recognised model in a local folder, keyed by ``/``-separated relative path.

    SavedModel and ``.mlpackage`` directories are described as one model and not descended
    into (a folder that is itself one is returned as ``{".": ...}``); hidden entries (``.git``,
    ``.cache``) are skipped. With ``strict=False`` a malformed
    model is reported as a description whose ``warnings`` hold the error instead of raising.
    At most :data:`MAX_DESCRIBED` model files are described, :data:`MAX_ISOLATED` of them in a
    child process; the paths of the others go to ``left_out``.
    """
    limits = {"all": MAX_DESCRIBED, "isolated": MAX_ISOLATED}
    skipped = left_out if left_out is not None else []

    def within(path: str, fmt: str) -> bool:
        isolated = fmt in _ISOLATED
        if limits["all"] <= 0 or (isolated and limits["isolated"] <= 0):
            skipped.append(_relative(path, top))
            return False
        limits["all"] -= 1
        limits["isolated"] -= isolated
        return True

    top = os.fspath(root)
    fmt = _detect_dir(DirSource(top, open))
    if fmt is not None:
        return {".": _guarded(fmt, strict, lambda: _describe_dir(DirSource(top, open)))}
    found: dict[str, ModelDescription] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            source = DirSource(full, open)
            fmt = _detect_dir(source)
            if fmt is None:
                keep.append(d)
                continue
            if within(full, fmt):
                found[_relative(full, top)] = _guarded(fmt, strict, partial(_describe_dir, source))
        dirnames[:] = keep
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            full = os.path.join(dirpath, filename)
            if not os.path.isfile(full):
                continue
            fmt = detect(full)
            if fmt is not None and within(full, fmt):
                found[_relative(full, top)] = _guarded(fmt, strict, lambda p=full: describe(p))
    return dict(sorted(found.items()))


def _relative(path: str, top: str) -> str:
    return os.path.relpath(path, top).replace(os.sep, "/")


def _guarded(fmt: str, strict: bool, run: Callable[[], ModelDescription]) -> ModelDescription:
    try:
        return run()
    except ModelFormatError as exc:
        if strict:
            raise
        return ModelDescription(format=fmt, warnings=[str(exc)])
