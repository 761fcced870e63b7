"""One measurement in a fresh process: ``python -m cvmfs_ml.bench.worker SPEC.json RESULT.json``.

Every load is measured in its own interpreter, because both things a load leaves behind would
falsify the next one: the process's peak RSS never goes down, and pages a process has mapped
stay in the page cache. The parent (:mod:`cvmfs_ml.bench.runner`) prepares the cache state,
writes a spec, runs this module and reads the result file.

The spec says how to reach the model (``access``) and how to load it (``runtime``):

* ``access.kind = "path"`` - the files are in a folder (local disk, a FUSE mount, ``/cvmfs``);
* ``"cvmfs"`` - read every file into memory through the cvmfs-ml Python client (the fsspec
  filesystem when ``client == "fsspec"``, else :class:`~cvmfs_ml.client.repository.Repository`);
* ``"get"`` - ``cvmfs-ml model get`` without a mount: the client fetches the model folder into
  its cache (parallel, verified) and hard-links or copies it into a local folder, then load;
* ``"download"`` - HTTP GET every file to a local folder first, then load from there (what
  KServe's storage initializer does);
* ``"oci"`` - ``oras pull`` the model artifact from a registry to a local folder, then load.

Runtimes: ``onnxruntime`` (a session, then real inference on fixed, seeded inputs),
``safetensors`` (``safetensors.numpy``) and ``torch`` (``torch.load``). The last two have no
graph to run; their "inference" is a pass that reads every tensor (a float64 sum per tensor),
so that first-inference time still means "every weight was really read".

Times (``time.perf_counter``) start after the imports: ``open_s`` is the time until the session
or tensors are ready (including any download), ``first_inference_s`` until the first output,
``latencies_s`` the following runs. The output digest (sha256 of the output bytes) lets the
runner check that every storage mode computed the same thing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_spec"]


def _proc_io() -> dict[str, int]:
    """``rchar``/``read_bytes`` of this process: what it read with read() and from disk."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("rchar", "read_bytes"):
                out[key] = int(value)
    except OSError:
        pass
    return out


def _peak_rss() -> int | None:
    """Peak resident set of this process (``VmHWM``), in bytes.

    ``getrusage``'s ``ru_maxrss`` is no good here: Linux carries it across ``fork`` and
    ``execve``, so a worker would report its parent's peak. ``VmHWM`` belongs to the address
    space, which ``execve`` replaces.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _resident(paths: list[Path]) -> tuple[float | None, dict[str, np.ndarray]]:
    """Size-weighted resident fraction of ``paths`` and the per-file maps (None on failure)."""
    from cvmfs_ml.bench.residency import residency_map

    maps: dict[str, np.ndarray] = {}
    try:
        for p in paths:
            maps[p.name] = residency_map(p)
    except OSError:
        return None, {}
    pages = sum(m.size for m in maps.values())
    if not pages:
        return 1.0, maps
    return float(sum(int(m.sum()) for m in maps.values()) / pages), maps


# --------------------------------------------------------------------------------------------
# acquiring the bytes


def _open_client(access: dict[str, Any]) -> Any:
    """The cvmfs-ml client on the repository ``access`` names (URL, key, cache, proxy)."""
    from cvmfs_ml.client.repository import Repository

    return Repository.open(access["url"], fqrn=access.get("fqrn"),
                           public_key=access.get("public_key"), cache=access.get("cache"),
                           proxy=access.get("proxy"))


def _read_cvmfs(access: dict[str, Any], files: list[str]) -> dict[str, bytes]:
    """Read ``files`` below ``access['root']`` into memory with the cvmfs-ml Python client."""
    root = access.get("root", "").strip("/")
    if access.get("client") == "fsspec":
        import fsspec

        fs = fsspec.filesystem("cvmfs", **access.get("storage_options", {}))
        out = {}
        for name in files:
            with fs.open(f"{access['fqrn']}/{root}/{name}", "rb") as f:
                out[name] = f.read()
        return out
    with _open_client(access) as repo:
        out = {}
        for name in files:
            with repo.open_file(f"/{root}/{name}") as f:
                out[name] = f.read()
        return out


def _model_get(access: dict[str, Any]) -> Path:
    """``model get --copy``: materialise ``access['root']`` into ``access['dest']``."""
    from cvmfs_ml.models.materialise import materialise

    with _open_client(access) as repo:
        return materialise(repo, access["root"], Path(access["dest"]))


def _download(access: dict[str, Any], files: list[str]) -> Path:
    """GET every file to ``access['dest']`` in 8 MiB pieces, one after the other."""
    import urllib3

    dest = Path(access["dest"])
    http = urllib3.PoolManager()
    buf = memoryview(bytearray(8 << 20))
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        response = http.request("GET", f"{access['base_url'].rstrip('/')}/{name}",
                                preload_content=False)
        if response.status != 200:
            raise OSError(f"GET {name}: HTTP {response.status}")
        with open(target, "wb") as out:
            while True:
                n = response.readinto(buf)
                if not n:
                    break
                out.write(buf[:n])
        response.release_conn()
    return dest


def _oras_pull(access: dict[str, Any]) -> Path:
    """Pull an ORAS artifact into ``access['dest']`` (plain-HTTP local registry)."""
    import oras.client

    dest = Path(access["dest"])
    dest.mkdir(parents=True, exist_ok=True)
    client = oras.client.OrasClient(hostname=access["registry"], insecure=True)
    client.pull(target=access["reference"], outdir=str(dest))
    return dest


# --------------------------------------------------------------------------------------------
# runtimes


def _ort_session(spec: dict[str, Any], folder: Path | None, blobs: dict[str, bytes] | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(spec.get("threads", 1))
    so.inter_op_num_threads = 1
    for key, value in spec.get("ort_config", {}).items():
        so.add_session_config_entry(key, str(value))
    entry = spec["model"]["entry"]
    providers = ["CPUExecutionProvider"]
    if blobs is None:
        assert folder is not None
        return ort.InferenceSession(str(folder / entry), so, providers=providers)
    names = [n for n in blobs if n != entry]
    if names:
        arrays = [np.frombuffer(blobs[n], dtype=np.uint8) for n in names]
        so.add_external_initializers_from_files_in_memory(names, arrays,
                                                          [a.size for a in arrays])
    return ort.InferenceSession(blobs[entry], so, providers=providers)


class _Touch:
    """The "inference" of a bare checkpoint: a float64 sum of every tensor, in a fixed order."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def run(self) -> list[np.ndarray]:
        sums = []
        for name in sorted(self.tensors):
            t = self.tensors[name]
            arr = t.float().numpy() if hasattr(t, "numpy") and hasattr(t, "float") else t
            if arr.dtype.kind == "V" or arr.dtype == np.uint16:  # bfloat16 bits: sum the bits
                arr = arr.view(np.uint16)
            sums.append(np.float64(np.sum(arr, dtype=np.float64)))
        return [np.asarray(sums, dtype=np.float64)]


def _open_model(spec: dict[str, Any], folder: Path | None,
                blobs: dict[str, bytes] | None) -> tuple[Any, Any]:
    """(session-like object, run function returning a list of arrays)."""
    runtime = spec["runtime"]
    entry = spec["model"]["entry"]
    if runtime == "onnxruntime":
        session = _ort_session(spec, folder, blobs)
        from cvmfs_ml.bench.generators import example_inputs

        inputs = example_inputs(session, **spec.get("inputs", {}))
        return session, lambda: session.run(None, inputs)
    if runtime == "safetensors":
        import safetensors.numpy as st

        tensors = (st.load(blobs[entry]) if blobs is not None
                   else st.load_file(str(folder / entry)))  # type: ignore[operator]
        touch = _Touch(tensors)
        return touch, touch.run
    if runtime == "torch":
        import torch

        torch.set_num_threads(int(spec.get("threads", 1)))
        source = io.BytesIO(blobs[entry]) if blobs is not None else str(folder / entry)  # type: ignore[operator]
        tensors = torch.load(source, map_location="cpu", weights_only=True)
        touch = _Touch(dict(tensors))
        return touch, touch.run
    if runtime in ("transformers", "onnxruntime-genai") and folder is None:
        from cvmfs_ml.bench.genai import materialise

        folder = materialise(blobs or {})  # these load from a folder only
    if runtime == "onnxruntime-genai":
        from cvmfs_ml.bench.genai import GreedyGenerator

        generator = GreedyGenerator(folder, new_tokens=int(spec.get("new_tokens", 16)))
        return generator, generator.run
    if runtime == "transformers":
        assert folder is not None
        import torch
        from transformers import AutoModel

        torch.set_num_threads(int(spec.get("threads", 1)))
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        ids = torch.zeros((1, 8), dtype=torch.long)

        def forward() -> list[np.ndarray]:
            with torch.no_grad():
                out = model(input_ids=ids)
            first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
            return [first.float().numpy()]

        return model, forward
    raise ValueError(f"unknown runtime {runtime!r}")


def _import_libraries(runtime: str, access: str, client: str | None) -> None:
    """Import what the load will use before the clock starts: imports are not loading."""
    import importlib

    modules = {"onnxruntime": ["onnxruntime", "cvmfs_ml.bench.generators"],
               "safetensors": ["safetensors.numpy"], "torch": ["torch"],
               "transformers": ["torch", "transformers"],
               "onnxruntime-genai": ["onnxruntime_genai", "cvmfs_ml.bench.genai"]}.get(runtime, [])
    if access == "cvmfs":
        modules += (["fsspec", "cvmfs_ml.client.fsspec"] if client == "fsspec"
                    else ["cvmfs_ml.client.repository"])
    elif access == "get":
        modules += ["cvmfs_ml.client.repository", "cvmfs_ml.models.materialise"]
    elif access == "download":
        modules.append("urllib3")
    elif access == "oci":
        modules.append("oras.client")
    for name in modules:
        importlib.import_module(name)


def _digest(outputs: list[Any]) -> str:
    h = hashlib.sha256()
    for out in outputs:
        arr = np.ascontiguousarray(out)
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Do the measurement ``spec`` describes in this process and return the result record."""
    access = spec["access"]
    t_import = time.perf_counter()
    _import_libraries(spec["runtime"], access["kind"], access.get("client"))
    import_s = time.perf_counter() - t_import
    files: list[str] = spec["model"]["files"]
    result: dict[str, Any] = {"import_s": import_s}
    pre_paths = ([Path(access["root"]) / f for f in files]
                 if access["kind"] == "path" and spec.get("residency") else [])
    if pre_paths:
        result["pre_resident_fraction"], _ = _resident(pre_paths)
    io_before = _proc_io()
    t0 = time.perf_counter()
    folder: Path | None = None
    blobs: dict[str, bytes] | None = None
    kind = access["kind"]
    if kind == "path":
        folder = Path(access["root"])
    elif kind == "cvmfs":
        blobs = _read_cvmfs(access, files)
    elif kind == "get":
        folder = _model_get(access)
    elif kind == "download":
        folder = _download(access, files)
    elif kind == "oci":
        folder = _oras_pull(access)
    else:
        raise ValueError(f"unknown access kind {kind!r}")
    result["acquire_s"] = time.perf_counter() - t0
    session, run = _open_model(spec, folder, blobs)
    result["open_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs = run()
    t2 = time.perf_counter()
    if getattr(session, "first_token_s", None) is not None:  # generative: time to first token
        result["first_token_s"] = t1 - t0 + session.first_token_s
    result["first_run_s"] = t2 - t1
    result["first_inference_s"] = t2 - t0
    result["output_sha256"] = _digest(outputs)
    if pre_paths:
        fraction, maps = _resident(pre_paths)
        result["post_resident_fraction"] = fraction
        out = spec.get("residency_out")
        if out and maps:
            np.savez_compressed(out, **{k: np.packbits(v) for k, v in maps.items()},
                                **{f"__pages__{k}": np.array(v.size) for k, v in maps.items()})
    latencies = []
    for _ in range(int(spec.get("inference_runs", 0))):
        ts = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - ts)
    result["latencies_s"] = latencies
    usage = resource.getrusage(resource.RUSAGE_SELF)
    io_after = _proc_io()
    result.update(
        peak_rss_bytes=_peak_rss(),
        major_faults=usage.ru_majflt,
        minor_faults=usage.ru_minflt,
        rchar=io_after.get("rchar", 0) - io_before.get("rchar", 0),
        disk_read_bytes=io_after.get("read_bytes", 0) - io_before.get("read_bytes", 0),
    )
    if blobs is not None:
        result["bytes_in_memory"] = sum(len(b) for b in blobs.values())
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the spec file, write the result file; exit 0 even on a failed load.

    A failed load is a result (``ok: false`` with the error), not a crash of the benchmark.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m cvmfs_ml.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    try:
        result = {"ok": True, **run_spec(spec)}
    except Exception as exc:  # a broken load is reported, not raised
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    tmp = Path(args[1] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
