"""Pictures and numbers of how a loader reads a model: access heatmaps and residency strips.

An access trace is, per file, the ordered list of ``(offset, length)`` reads the FUSE layer
served (optionally ``(offset, length, t)`` with a timestamp). :func:`plot_heatmap` draws one
panel per file: x is the position in the file, y the read order (or time), colour the number
of reads that covered that spot, so sequential scans show as diagonals, mmap faults as
scattered dots and re-reads as hot cells. :func:`summarise_accesses` condenses a trace into
the numbers a report table needs.

matplotlib is imported lazily with the Agg backend, so the module works on headless machines
and importing it costs nothing when only the summary is wanted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_heatmap", "plot_residency", "summarise_accesses"]

Access = tuple[int, int] | tuple[int, int, float]
_MiB = float(1 << 20)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _access_grid(reads: Sequence[Access], size: int, x_bins: int,
                 y_bins: int) -> tuple[np.ndarray, float, bool]:
    """Counts per (row, column) cell; returns grid, y extent and whether y is time."""
    arr = np.asarray([r[:3] if len(r) == 3 else (r[0], r[1], math.nan) for r in reads],
                     dtype=np.float64).reshape(-1, 3)
    timed = bool(arr.size) and not np.isnan(arr[:, 2]).any()
    n = len(arr)
    size = max(size, 1)
    if timed:
        t = arr[:, 2] - arr[:, 2].min()
        span = float(t.max()) or 1.0
        rows_n = y_bins
        rows = np.minimum((t / span * rows_n).astype(np.int64), rows_n - 1)
        extent = span
    else:
        rows_n = max(1, min(y_bins, n))
        rows = (np.arange(n) * rows_n) // max(n, 1)
        extent = float(n)
    start = np.clip(arr[:, 0], 0, size)
    end = np.clip(arr[:, 0] + arr[:, 1], 0, size)
    c0 = np.minimum((start * x_bins / size).astype(np.int64), x_bins - 1)
    c1 = np.maximum(np.ceil(end * x_bins / size).astype(np.int64), c0 + 1)
    diff = np.zeros((rows_n, x_bins + 1), dtype=np.int64)
    np.add.at(diff, (rows, c0), 1)
    np.add.at(diff, (rows, np.minimum(c1, x_bins)), -1)
    return np.cumsum(diff[:, :x_bins], axis=1), extent, timed


def plot_heatmap(
    accesses: Mapping[str, Sequence[Access]],
    sizes: Mapping[str, int],
    out_png: str | os.PathLike[str],
    title: str,
    *,
    x_bins: int = 512,
    y_bins: int = 256,
    max_files: int = 12,
) -> Path:
    """Draw one access panel per file (the ``max_files`` most-read ones) into ``out_png``."""
    from matplotlib.colors import LogNorm, Normalize

    plt = _pyplot()
    out = Path(out_png)
    names = [n for n in accesses if accesses[n]]
    names.sort(key=lambda n: -sum(r[1] for r in accesses[n]))
    shown = names[:max_files] or list(accesses)[:1]
    cols = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, shown, strict=False):
        reads = accesses.get(name, [])
        size = int(sizes.get(name, 0)) or max((r[0] + r[1] for r in reads), default=1)
        grid, extent, timed = _access_grid(reads, size, x_bins, y_bins)
        masked = np.ma.masked_equal(grid, 0)
        vmax = max(int(grid.max()), 1)
        norm = LogNorm(vmin=1, vmax=vmax) if vmax > 1 else Normalize(vmin=0, vmax=1)
        image = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="viridis",
                          norm=norm, extent=(0, size / _MiB, extent, 0))
        fig.colorbar(image, ax=ax, label="reads")
        read = sum(r[1] for r in reads)
        ax.set_title(f"{_short(name)}\n{read / _MiB:.1f} MiB in {len(reads)} reads "
                     f"of {size / _MiB:.1f} MiB", fontsize=9)
        ax.set_xlabel("offset in file (MiB)")
        ax.set_ylabel("time (s)" if timed else "read number")
    hidden = len(names) - len(shown)
    fig.suptitle(title + (f" ({hidden} more files not shown)" if hidden > 0 else ""))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_residency(maps: Mapping[str, np.ndarray], out_png: str | os.PathLike[str],
                   title: str = "page-cache residency", *, bins: int = 1024) -> Path:
    """One strip per file: the fraction of resident pages along the file (dark = cached)."""
    plt = _pyplot()
    out = Path(out_png)
    names = list(maps)
    strips = np.full((max(1, len(names)), bins), np.nan)
    labels = []
    for i, name in enumerate(names):
        m = np.asarray(maps[name], dtype=np.float64)
        labels.append(f"{_short(name)} ({m.mean() * 100 if m.size else 0.0:.0f}%)")
        if m.size >= bins:  # average the pages of each column
            column = (np.arange(m.size) * bins) // m.size
            strips[i] = (np.bincount(column, weights=m, minlength=bins)
                         / np.bincount(column, minlength=bins))
        elif m.size:  # fewer pages than columns: each column shows its page
            strips[i] = m[(np.arange(bins) * m.size) // bins]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    image = ax.imshow(np.ma.masked_invalid(strips), aspect="auto", interpolation="nearest",
                      cmap="Greens", vmin=0, vmax=1, extent=(0, 1, len(names) or 1, 0))
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("position in file (fraction)")
    fig.colorbar(image, ax=ax, label="resident fraction")
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _covered(reads: Sequence[Access]) -> int:
    """Bytes covered by at least one read (union of the intervals)."""
    spans = sorted((r[0], r[0] + r[1]) for r in reads if r[1] > 0)
    total, cur_start, cur_end = 0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def _stats(reads: Sequence[Access], size: int | None) -> dict[str, Any]:
    lengths = [int(r[1]) for r in reads]
    sequential = 0
    prev_end = 0  # a first read at offset 0 counts as the start of a sequential scan
    for r in reads:
        if r[0] == prev_end:
            sequential += 1
        prev_end = r[0] + r[1]
    unique = _covered(reads)
    return {
        "read_count": len(reads),
        "bytes_read": sum(lengths),
        "unique_bytes": unique,
        "file_size": size,
        "fraction_of_file": (unique / size) if size else None,
        "amplification": (sum(lengths) / unique) if unique else None,
        "sequential_fraction": (sequential / len(reads)) if reads else None,
        "median_read_size": float(np.median(lengths)) if lengths else None,
    }


def summarise_accesses(accesses: Mapping[str, Sequence[Access]],
                       sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per-file and total numbers of an access trace.

    For each file: ``read_count``, ``bytes_read`` (sum of lengths), ``unique_bytes`` (bytes
    covered at least once), ``file_size``, ``fraction_of_file`` (unique / size),
    ``amplification`` (bytes read / unique bytes), ``sequential_fraction`` (reads that start
    where the previous read of the same file ended; a first read at offset 0 counts) and
    ``median_read_size``. ``total`` aggregates over files (sequential fraction and median over
    all reads).
    """
    sizes = sizes or {}
    files = {name: _stats(reads, sizes.get(name)) for name, reads in accesses.items()}
    all_lengths = [int(r[1]) for reads in accesses.values() for r in reads]
    n = sum(f["read_count"] for f in files.values())
    seq = sum(f["sequential_fraction"] * f["read_count"] for f in files.values() if f["read_count"])
    size_total = sum(sizes.get(name, 0) for name in accesses) if sizes else None
    unique = sum(f["unique_bytes"] for f in files.values())
    return {
        "files": files,
        "total": {
            "files": len(files),
            "read_count": n,
            "bytes_read": sum(all_lengths),
            "unique_bytes": unique,
            "file_size": size_total,
            "fraction_of_file": (unique / size_total) if size_total else None,
            "amplification": (sum(all_lengths) / unique) if unique else None,
            "sequential_fraction": (seq / n) if n else None,
            "median_read_size": float(np.median(all_lengths)) if all_lengths else None,
        },
    }
