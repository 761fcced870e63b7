"""``cvmfs-ml demo``: the whole loop on an embedded default, with numbers.

Create a repository, publish two generated ONNX models (a small MLP with inline weights and an
LLM-shaped model whose weights live in external data), serve the repository over HTTP with the
built-in server, read it back **cold** through the client (fsspec and, where FUSE works, a
mount), run onnxruntime on what came back, and compare with local disk. Everything runs on
loopback, in ``out``; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvmfs_ml.bench.caches import drop_page_cache
from cvmfs_ml.bench.generators import example_inputs, make_llm_onnx, make_mlp_onnx
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

__all__ = ["DemoRow", "DemoResult", "prepare_out", "run_demo"]

FQRN = "demo.cvmfs-ml.local"
MARKER = ".cvmfs-ml-demo"
"""A file the demo leaves in its folder: only a folder holding it is ever wiped."""


@dataclass
class DemoRow:
    model: str
    mode: str
    cache: str
    open_s: float
    first_inference_s: float
    bytes_from_network: int = 0
    identical_output: bool = True
    note: str = ""


@dataclass
class DemoResult:
    out: str
    url: str
    publish_s: float
    published_bytes: int
    rows: list[DemoRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _session(path: Path | str) -> tuple[Any, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - started


def _infer(session: Any, inputs: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    outputs = session.run(None, inputs)
    return outputs, time.perf_counter() - started


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b, strict=False)
    )


@contextlib.contextmanager
def _maybe_mount(url: str, key: Path, cache: Path, mountpoint: Path) -> Iterator[Any]:
    """A FUSE mount of the served repository, or ``None`` with the reason when FUSE is absent."""
    try:
        from cvmfs_ml.client.fuse import mount
    except ImportError as exc:
        yield f"FUSE not available ({exc})"
        return
    if not os.path.exists("/dev/fuse"):
        yield "FUSE not available (/dev/fuse missing)"
        return
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        handle = mount(url, mountpoint, public_key=key, cache=cache, timeout=60)
    except Exception as exc:  # the demo reports and goes on without the mount
        yield f"FUSE mount failed: {exc}"
        return
    try:
        yield handle
    finally:
        handle.unmount()


def prepare_out(out: Path) -> Path:
    """Make ``out`` an empty demo folder and return its absolute path.

    A missing or empty folder is used as it is; a folder left by an earlier demo (it holds
    :data:`MARKER`) is emptied; anything else is refused, because wiping a folder a user
    named by mistake (``--out .``, ``--out ~``) would destroy their files.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"demo folder {out} is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(
                f"demo folder {out} is not empty and was not made by the demo; "
                "choose an empty or new --out"
            )
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by cvmfs-ml demo; the next demo run may empty this folder\n")
    return out


def run_demo(
    out: Path,
    *,
    llm_bytes: int = 64 * 2**20,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo in ``out`` (see :func:`prepare_out`); returns the measured rows."""
    out = prepare_out(out)
    models = out / "models"
    (models / "mlp").mkdir(parents=True)
    log("generating models (ONNX MLP, LLM-shaped ONNX with external data)")
    make_mlp_onnx(models / "mlp" / "model.onnx")
    make_llm_onnx(models / "llm", total_bytes=llm_bytes, dtype="float32")

    log("creating the repository and publishing demo/mlp:1 and demo/llm:1")
    publisher = create_repository(out / "srv", FQRN, settings=PublishSettings())
    started = time.perf_counter()
    for name in ("mlp", "llm"):
        publish_model(
            publisher,
            models / name,
            ModelRef.parse(f"demo/{name}:1"),
            description=f"generated {name} model (cvmfs-ml demo)",
        )
    publish_s = time.perf_counter() - started
    published = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    key = publisher.keys.paths.master_public

    with RepositoryServer(out / "srv").start() as server:
        url = f"{server.url}/cvmfs/{FQRN}"
        result = DemoResult(str(out), url, publish_s, published)
        log(f"serving {url}")
        for name in ("mlp", "llm"):
            local_path = models / name / "model.onnx"
            drop_page_cache([models / name])
            session, open_s = _session(local_path)
            inputs = example_inputs(session)
            expected, infer_s = _infer(session, inputs)
            result.rows.append(DemoRow(name, "local disk", "cold", open_s, infer_s))
            session, open_s = _session(local_path)
            _, infer_s = _infer(session, inputs)
            result.rows.append(DemoRow(name, "local disk", "hot", open_s, infer_s))
            del session

            result.rows.append(
                _fsspec_row(
                    name, url, key, out / "cache-fsspec", inputs, expected, out / "fsspec-copy"
                )
            )
            with _maybe_mount(url, key, out / f"cache-fuse-{name}", out / "mnt" / name) as mounted:
                if isinstance(mounted, str):
                    if mounted not in result.skipped:
                        result.skipped.append(mounted)
                    continue
                mounted_model = Path(mounted.mountpoint) / "demo" / name / "1" / "model.onnx"
                for cache_state in ("cold", "hot"):
                    session, open_s = _session(mounted_model)
                    outputs, infer_s = _infer(session, inputs)
                    result.rows.append(
                        DemoRow(
                            name,
                            "cvmfs-ml FUSE",
                            cache_state,
                            open_s,
                            infer_s,
                            identical_output=_same(outputs, expected),
                        )
                    )
                    del session
    (out / "demo.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _fsspec_row(
    name: str,
    url: str,
    key: Path,
    cache: Path,
    inputs: dict[str, np.ndarray],
    expected: list[np.ndarray],
    scratch: Path,
) -> DemoRow:
    """Cold read of the model folder through fsspec ``cvmfs://``, then onnxruntime on a copy.

    onnxruntime needs a path for external data, so fsspec's reads land in a scratch folder:
    what KServe's storage initializer does, but from CVMFS with verified, parallel fetches.
    """
    import fsspec

    fs = fsspec.filesystem(
        "cvmfs", fqrn=FQRN, url=url, public_key=str(key), cache=str(cache), skip_instance_cache=True
    )
    target = scratch / name
    started = time.perf_counter()
    fs.get(f"{FQRN}/demo/{name}/1/", str(target), recursive=True)
    fetch_s = time.perf_counter() - started
    session, open_s = _session(target / "model.onnx")
    outputs, infer_s = _infer(session, inputs)
    network = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return DemoRow(
        name,
        "cvmfs-ml fsspec (download)",
        "cold",
        fetch_s + open_s,
        infer_s,
        bytes_from_network=network,
        identical_output=_same(outputs, expected),
        note=f"fetch {fetch_s:.3f} s",
    )
