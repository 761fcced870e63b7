"""A KServe ``ModelServer`` model serving an ONNX model from CVMFS, following an alias.

Point it at a folder in a mount (``/cvmfs/<fqrn>/<ns>/<name>/prod``), a ``cvmfs://`` reference,
or any local folder or ``.onnx`` file::

    python -m cvmfs_ml.integrations.kserve_server --model_name tagger \\
        --model_dir /cvmfs/models.example.org/hep/tagger/prod --http_port 8080

It answers KServe's v2 inference protocol (``/v2/models/<name>/infer``) with onnxruntime. The
server loads the version the alias names at start, then polls the alias every
``--poll_interval`` seconds (by reading where the link points, which the mount refreshes when
the repository's TTL expires); when the alias has moved it loads the new version next to the old
one and swaps them, so requests never see a half-loaded model. A failed reload keeps serving the
previous version. Without a mount, a ``cvmfs://`` reference is materialised from the client's
cache (:func:`cvmfs_ml.models.refs.locate`) and polled the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.utils.numpy_codec import from_np_dtype

from cvmfs_ml.errors import ConfigError, NotFoundError

__all__ = ["CvmfsOnnxModel", "main", "source_for"]

log = logging.getLogger(__name__)


def _onnx_file(folder: Path, model_file: str | None) -> Path:
    """``folder/model_file``, or the largest ``.onnx`` file of the folder (or the file itself)."""
    if folder.is_file():
        return folder
    if model_file:
        return folder / model_file
    candidates = sorted(folder.rglob("*.onnx"), key=lambda p: (-p.stat().st_size, str(p)))
    if not candidates:
        raise NotFoundError("*.onnx", str(folder))
    return candidates[0]


def source_for(location: str) -> Callable[[], Path]:
    """A function giving the folder ``location`` names *now* (aliases resolved at each call)."""
    if location.startswith("cvmfs://"):
        from cvmfs_ml.models.refs import (
            check_version,
            locate,
            mount_roots,
            mounted_root,
            parse_uri,
            resolve_in_mount,
        )

        uri = parse_uri(location)
        mount = mounted_root(uri.fqrn or "", mount_roots())
        if mount is None:
            return lambda: locate(uri).path

        def in_mount() -> Path:  # an alias out of the repository, or to '..', is refused
            found = resolve_in_mount(mount, uri.path)
            check_version(uri, str(found.relative_to(os.path.realpath(mount))))
            return found

        return in_mount
    path = Path(location)
    return lambda: Path(os.path.realpath(path))


class CvmfsOnnxModel(Model):
    """An ONNX model (onnxruntime) read from CVMFS, reloaded when its alias moves."""

    def __init__(
        self,
        name: str,
        source: Callable[[], Path],
        *,
        model_file: str | None = None,
        poll_interval: float = 10.0,
    ) -> None:
        super().__init__(name)
        self.source = source
        self.model_file = model_file
        self.poll_interval = poll_interval
        self.folder: Path | None = None
        self._session: Any = None
        self._swap = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.reloads = 0

    @property
    def version(self) -> str | None:
        """The served version: the name of the folder the alias pointed to when loaded."""
        return None if self.folder is None else self.folder.name

    def _open(self, folder: Path) -> Any:
        import onnxruntime as ort

        path = _onnx_file(folder, self.model_file)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def load(self) -> bool:
        folder = self.source()
        session = self._open(folder)
        with self._swap:
            self._session, self.folder = session, folder
        self.ready = True
        if self.poll_interval > 0 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="cvmfs-alias-watch",
                                             daemon=True)  # fmt: skip
            self._watcher.start()
        log.info("model %s: loaded %s", self.name, folder)
        return self.ready

    def check_alias(self) -> bool:
        """Reload if the alias now names another folder; ``True`` when it did."""
        folder = self.source()
        if folder == self.folder:
            return False
        session = self._open(folder)  # next to the old one: requests keep being answered
        with self._swap:
            self._session, self.folder = session, folder
        self.reloads += 1
        log.info("model %s: alias moved, now serving %s", self.name, folder)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.check_alias()
            except Exception as exc:  # whatever fails (bad model, server down), keep serving
                log.warning("model %s: alias check failed, still serving %s: %s",
                            self.name, self.folder, exc)  # fmt: skip

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    async def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:  # fmt: skip
        with self._swap:
            session, version = self._session, self.version
        if session is None:
            raise ConfigError(f"model {self.name} is not loaded")
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        names = [output.name for output in session.get_outputs()]
        results = session.run(names, feeds)
        outputs = []
        for name, value in zip(names, results, strict=True):
            array = np.asarray(value)
            output = InferOutput(name, list(array.shape), from_np_dtype(array.dtype))
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        return InferResponse(payload.id or "", self.name, outputs, model_version=version)


def main(argv: list[str] | None = None) -> None:
    """``python -m cvmfs_ml.integrations.kserve_server``: KServe's own options, plus ours."""
    parser = argparse.ArgumentParser(
        parents=[model_server.parser],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model_dir", required=True, help="folder or .onnx file, or a cvmfs:// reference"
    )
    parser.add_argument("--model_file", default=None, help="the .onnx file inside the folder")
    parser.add_argument("--poll_interval", type=float, default=10.0,
                        help="seconds between alias checks (0: never)")  # fmt: skip
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        model = CvmfsOnnxModel(
            args.model_name,
            source_for(args.model_dir),
            model_file=args.model_file,
            poll_interval=args.poll_interval,
        )
        model.load()
    except Exception as exc:  # a bad reference, no such folder, not ONNX...: one line, exit 1
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise SystemExit(
            f"cvmfs-ml kserve_server: cannot load {args.model_dir}: {reason}"
        ) from None
    ModelServer().start([model])


if __name__ == "__main__":
    main()
