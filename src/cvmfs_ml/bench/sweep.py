"""The chunk-size and compression sweep (issue 5 item 10): ``cvmfs-ml bench sweep``.

For each publishing setting (chunk sizes MIN/AVG/MAX, compression) the sweep creates a fresh
repository and reports what the setting costs and buys:

* **publish time** and **repository size** for the model (version 1);
* **dedup**: the model is then "fine-tuned" (:func:`~cvmfs_ml.bench.generators.fine_tune_variant`
  perturbs tensors covering ``fine_tune_fraction`` of the bytes; everything else stays
  byte-identical) and published as version 2 in the same repository; the new bytes stored show
  how well the chunking isolates the change;
* **cold load time** of version 1 through a FUSE mount (or the fsspec client) from the
  repository served over HTTP, each load in a fresh worker process.

Each point's repository is deleted after it is measured (2 GB models, several points).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.bench import report as rpt
from cvmfs_ml.bench.environment import run_worker
from cvmfs_ml.bench.modes import CacheState, Endpoint, ModeContext, make_mode
from cvmfs_ml.bench.zoo import BuiltModel, ModelSpec, build_model
from cvmfs_ml.errors import ConfigError

__all__ = ["SweepPoint", "parse_points", "run_sweep"]

_MiB = 2**20
_FQRN = "sweep.cvmfs-ml.test"


@dataclass(frozen=True)
class SweepPoint:
    """One publishing setting: chunk sizes in bytes (None: no chunking) and compression."""

    chunks: tuple[int, int, int] | None
    compression: str

    @property
    def label(self) -> str:
        sizes = "whole" if self.chunks is None else "/".join(f"{c / _MiB:g}" for c in self.chunks)
        return f"{sizes}-{self.compression}"


def parse_points(chunks: str, compressions: str) -> list[SweepPoint]:
    """``"4/8/16,16/32/64,off"`` × ``"zlib,none"`` -> the sweep's points (MiB)."""
    points = []
    for spec in (c.strip() for c in chunks.split(",") if c.strip()):
        if spec == "off":
            sizes = None
        else:
            try:
                low, avg, high = (int(float(x) * _MiB) for x in spec.split("/"))
            except ValueError:
                raise ConfigError(f"chunk sizes must look like 4/8/16 (MiB), not {spec!r}") \
                    from None
            sizes = (low, avg, high)
        for comp in (c.strip() for c in compressions.split(",") if c.strip()):
            points.append(SweepPoint(sizes, comp))
    if not points:
        raise ConfigError("the sweep needs at least one chunk setting and one compression")
    return points


def _settings(point: SweepPoint) -> Any:
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.settings import PublishSettings

    settings = PublishSettings(compression=Compression(point.compression))
    if point.chunks is None:
        return settings.with_(use_chunking=False)
    low, avg, high = point.chunks
    return settings.with_(min_chunk_size=low, avg_chunk_size=avg, max_chunk_size=high)


def _measure_point(point: SweepPoint, model: BuiltModel, variant: Path, root: Path,
                   *, load_mode: str, repeats: int, timeout: float,
                   log: Callable[[str], None]) -> dict[str, Any]:
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.storage.http import RepositoryServer

    shutil.rmtree(root, ignore_errors=True)
    (root / "srv").mkdir(parents=True)
    publisher = create_repository(root / "srv", _FQRN, keys_dir=root / "keys",
                                  settings=_settings(point))
    data = root / "srv" / _FQRN / "data"
    empty = rpt.disk_usage(data)
    with publisher.transaction() as txn:
        txn.add_folder(model.files.folder, at=f"/{model.name}")
        first = txn.commit()
    size_v1 = rpt.disk_usage(data) - empty
    with publisher.transaction() as txn:
        txn.add_folder(variant, at=f"/{model.name}-ft")
        second = txn.commit()
    size_v2 = rpt.disk_usage(data) - empty - size_v1
    row: dict[str, Any] = {
        "point": point.label,
        "chunks_mib": None if point.chunks is None else [c / _MiB for c in point.chunks],
        "compression": point.compression,
        "model": model.name, "model_bytes": model.files.nbytes,
        "publish_s": round(first.seconds, 3),
        "repo_bytes": size_v1,
        "stored_ratio": size_v1 / model.files.nbytes if model.files.nbytes else None,
        "objects_v1": first.stats.objects_new,
        "publish_v2_s": round(second.seconds, 3),
        "v2_new_bytes": size_v2,
        "v2_new_objects": second.stats.objects_new,
        "v2_reused_objects": second.stats.objects_existing,
        "dedup_saving": 1.0 - size_v2 / size_v1 if size_v1 else None,
    }
    log(f"sweep {point.label}: publish {first.seconds:.1f} s, {size_v1 / _MiB:.0f} MiB, "
        f"fine-tune adds {size_v2 / _MiB:.1f} MiB")
    server = RepositoryServer(root / "srv").start()
    mode = make_mode(load_mode)
    endpoint = Endpoint("loopback", f"{server.url}/cvmfs/{_FQRN}", _FQRN,
                        root / "keys" / f"{_FQRN}.pub")
    loads: list[float] = []
    errors: list[str] = []
    try:
        mode.start(ModeContext(root / "work", endpoint))
        for _ in range(repeats):
            mode.prepare(model.files, CacheState.COLD)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                spec = {"model": {"name": model.name, "entry": model.files.entry,
                                  "files": list(model.files.files)},
                        "runtime": model.files.runtime,
                        "access": mode.access(model.files, Path(tmp)),
                        "inputs": model.inputs, "inference_runs": 0, "threads": 1}
                result, _ = run_worker(spec, Path(tmp), timeout)
            if result.get("ok"):
                loads.append(result["first_inference_s"])
            else:
                errors.append(str(result.get("error")))
    finally:
        mode.stop()
        server.stop()
    row["load_mode"] = load_mode
    row["cold_load_s"] = statistics.median(loads) if loads else None
    row["cold_load_s_min"] = min(loads) if loads else None
    row["cold_load_s_max"] = max(loads) if loads else None
    row["errors"] = errors
    return row


def _plot(rows: Sequence[dict[str, Any]], out: Path) -> Path | None:
    rows = [r for r in rows if r.get("cold_load_s") is not None]
    if not rows:
        return None
    from cvmfs_ml.bench.heatmap import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = [r["point"] for r in rows]
    for ax, key, title in ((axes[0], "publish_s", "publish time (s)"),
                           (axes[1], "cold_load_s", "cold load, first inference (s)"),
                           (axes[2], "v2_new_bytes", "bytes added by a fine-tune (MiB)")):
        values = [r[key] / (_MiB if key == "v2_new_bytes" else 1) for r in rows]
        ax.bar(range(len(rows)), values, color="#3b6fb6")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"chunk size and compression sweep: {rows[0]['model']}")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(doc: dict[str, Any], path: Path) -> None:
    lines = [f"# Chunk-size and compression sweep: {doc['model']['name']}", "",
             f"- {doc['machine'].get('cpu_model')}, {doc['machine'].get('cpu_count')} CPUs; "
             f"fine-tune changes {doc['fine_tune']['changed_fraction'] * 100:.1f}% of the bytes",
             f"- cold load through `{doc['load_mode']}`, loopback, built-in server", "",
             "| chunks (MiB) | compression | publish | repo size | stored/raw | cold load | "
             "fine-tune adds | dedup saving |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["points"]:
        chunks = "whole file" if r["chunks_mib"] is None else "/".join(
            f"{c:g}" for c in r["chunks_mib"])
        load = "–" if r["cold_load_s"] is None else f"{r['cold_load_s']:.2f} s"
        lines.append(f"| {chunks} | {r['compression']} | {r['publish_s']:.1f} s | "
                     f"{r['repo_bytes'] / _MiB:.0f} MiB | {r['stored_ratio']:.3f} | {load} | "
                     f"{r['v2_new_bytes'] / _MiB:.1f} MiB | {r['dedup_saving'] * 100:.0f}% |")
    path.write_text("\n".join(lines) + "\n")


def run_sweep(model: ModelSpec, points: Sequence[SweepPoint], out_dir: str | os.PathLike[str],
              *, workdir: str | os.PathLike[str], fine_tune_fraction: float = 0.05,
              load_mode: str = "fuse", repeats: int = 1, timeout: float = 900.0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep and write ``sweep.json``, ``sweep.csv``, ``sweep.md``, ``sweep.png``."""
    import json

    from cvmfs_ml.bench.generators import fine_tune_variant

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(workdir)
    started = time.perf_counter()
    built = build_model(model, work / "models")
    variant = work / "models" / f"{model.name}-ft{int(fine_tune_fraction * 1000)}"
    sidecar = variant.with_name(variant.name + ".json")  # outside the published folder
    if not (variant.exists() and sidecar.exists()):
        shutil.rmtree(variant, ignore_errors=True)
        tune = fine_tune_variant(built.files.folder, variant, fraction=fine_tune_fraction)
        sidecar.write_text(json.dumps({"changed_fraction": tune.changed_fraction}))
    changed = float(json.loads(sidecar.read_text())["changed_fraction"])
    rows = []
    for point in points:
        root = work / "sweep" / point.label.replace("/", "_")
        try:
            rows.append(_measure_point(point, built, variant, root, load_mode=load_mode,
                                       repeats=repeats, timeout=timeout, log=log))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"schema": "cvmfs-ml-bench-sweep/1", "run_id": uuid.uuid4().hex[:12],
           "started": rpt.now_iso(), "machine": rpt.machine_info(), "versions": rpt.versions(),
           "model": {"name": built.name, "bytes": built.files.nbytes, "kind": model.kind,
                     "dtype": model.dtype},
           "fine_tune": {"fraction": fine_tune_fraction, "changed_fraction": changed},
           "load_mode": load_mode, "repeats": repeats, "points": rows,
           "seconds": round(time.perf_counter() - started, 1)}
    (out / "sweep.json").write_text(json.dumps(doc, indent=1))
    rpt.write_csv([{k: v for k, v in r.items() if k != "errors"} for r in rows],
                  out / "sweep.csv")
    _plot(rows, out)
    _markdown(doc, out / "sweep.md")
    return doc
