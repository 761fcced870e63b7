"""Run the CVMFS KServe model server as a process and talk v2 to it (tests, benchmarks, demos).

:func:`running_server` starts ``python -m cvmfs_ml.integrations.kserve_server`` on a loopback
port and returns once ``/v2/models/<name>/ready`` answers 200 (bounded by ``ready_timeout``);
:func:`v2_infer` sends one v2 inference request. Only the standard library is used, so this
module imports fast and does not pull in KServe.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvmfs_ml.errors import CvmfsMlError

__all__ = ["RunningServer", "free_port", "running_server", "v2_infer"]

_V2_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16",
             np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
             np.dtype(np.int32): "INT32"}  # fmt: skip


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    model_name: str
    process: subprocess.Popen[bytes]
    ready_s: float
    """Seconds from starting the process to the first 200 on the readiness endpoint."""


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running_server(
    model_dir: str | os.PathLike[str],
    *,
    model_name: str = "model",
    env: Mapping[str, str] | None = None,
    log: str | os.PathLike[str] | None = None,
    poll_interval: float = 10.0,
    ready_timeout: float = 300.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[RunningServer]:
    """A model server for ``model_dir`` (folder, ``.onnx`` file or ``cvmfs://`` reference)."""
    port = free_port()
    argv = [sys.executable, "-m", "cvmfs_ml.integrations.kserve_server",
            "--model_name", model_name, "--model_dir", os.fspath(model_dir),
            "--http_port", str(port), "--enable_grpc", "false", "--workers", "1",
            "--poll_interval", str(poll_interval), *extra_args]  # fmt: skip
    log_path = Path(log) if log is not None else Path(os.devnull)
    start = time.monotonic()
    with open(log_path, "ab") as out:
        process = subprocess.Popen(argv, env=dict(env) if env is not None else None,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while not _ready(f"{url}/v2/models/{model_name}/ready"):
            if process.poll() is not None:
                raise CvmfsMlError(f"model server exited with {process.returncode}; see {log}")
            if time.monotonic() - start > ready_timeout:
                raise CvmfsMlError(f"model server not ready in {ready_timeout:g} s; see {log}")
            time.sleep(0.05)
        yield RunningServer(url, model_name, process, time.monotonic() - start)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def v2_infer(
    server: RunningServer, inputs: Mapping[str, np.ndarray], *, timeout: float = 120.0
) -> tuple[dict[str, np.ndarray], str | None]:
    """One v2 request (JSON tensors); the outputs by name and the served model version."""
    body = {"inputs": [{"name": name, "shape": list(array.shape),
                        "datatype": _V2_TYPES[array.dtype], "data": array.ravel().tolist()}
                       for name, array in inputs.items()]}  # fmt: skip
    request = urllib.request.Request(
        f"{server.url}/v2/models/{server.model_name}/infer",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise CvmfsMlError(f"inference failed: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    return outputs, answer.get("model_version")
