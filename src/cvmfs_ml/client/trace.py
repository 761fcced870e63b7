"""Record every read that reaches the client, and condense a recording into numbers.

A trace answers "how does this loader read this model?": which bytes, in which order, how big
the requests were, what came from the local cache and what had to cross the network. It is
the raw material of access heat maps (``cvmfs-ml trace report``), and it is written while the
loader runs, so recording must be cheap and safe from many threads (FUSE worker threads, the
prefetch pool).

The file is JSON lines, one object per event, with the keys of :class:`TraceRecord`:

``path``      repository path of the file
``offset``    first byte of the read
``length``    bytes returned
``t``         wall-clock start of the read (seconds since the epoch)
``seconds``   how long the client took to answer
``source``    ``"hit"`` (every byte was in the local cache), ``"fetch"`` (the read waited for
              at least one piece to arrive) or ``"prefetch"`` (a piece fetched ahead of reads,
              not a read itself)
``net_bytes`` bytes this event caused to come over the network (or out of the store)
``size``      size of the file, so a summary can say how much of each file was read

The summary mirrors ``cvmfs_ml.bench.heatmap.summarise_accesses`` (same per-file keys) without
importing it, since the client layer must not depend on the benchmark layer.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError

__all__ = [
    "TraceRecord",
    "Tracer",
    "accesses_from_trace",
    "load_trace",
    "summarise_trace",
]

SOURCES = ("hit", "fetch", "prefetch")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One traced event (see the module docstring for the meaning of each field)."""

    path: str
    offset: int
    length: int
    t: float
    seconds: float
    source: str = "hit"
    net_bytes: int = 0
    size: int | None = None

    @property
    def is_read(self) -> bool:
        """Whether a reader asked for these bytes (prefetches are not reads)."""
        return self.source != "prefetch"


class Tracer:
    """Appends :class:`TraceRecord` lines to a file; safe to call from any thread.

    Lines are buffered and written in batches (every ``flush_every`` records, and on
    :meth:`flush` / :meth:`close`) so that tracing a FUSE mount costs microseconds per read.
    """

    def __init__(self, target: str | os.PathLike[str] | TextIO, *, flush_every: int = 256) -> None:
        if isinstance(target, (str, os.PathLike)):
            self.path: Path | None = Path(target)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self.path = None
            self._file = target
            self._owned = False
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._flush_every = max(1, flush_every)
        self.count = 0

    def record(
        self,
        path: str,
        offset: int,
        length: int,
        seconds: float,
        *,
        source: str = "hit",
        net_bytes: int = 0,
        size: int | None = None,
        t: float | None = None,
    ) -> None:
        """Note one event; ``t`` defaults to now minus ``seconds`` (the start of the read)."""
        if source not in SOURCES:
            raise ValueError(f"trace source must be one of {SOURCES}, not {source!r}")
        start = (time.time() - seconds) if t is None else t
        line = json.dumps(
            {
                "path": path,
                "offset": int(offset),
                "length": int(length),
                "t": round(start, 6),
                "seconds": round(seconds, 7),
                "source": source,
                "net_bytes": int(net_bytes),
                "size": size,
            },
            ensure_ascii=False,
        )
        with self._lock:
            self._pending.append(line)
            self.count += 1
            if len(self._pending) >= self._flush_every:
                self._write_pending()

    def _write_pending(self) -> None:
        if self._pending and not self._file.closed:
            self._file.write("\n".join(self._pending) + "\n")
        self._pending.clear()

    def flush(self) -> None:
        """Write buffered records out (call before reading the file while tracing goes on)."""
        with self._lock:
            self._write_pending()
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._write_pending()
            if self._owned and not self._file.closed:
                self._file.close()
            elif not self._file.closed:
                self._file.flush()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_trace(source: str | os.PathLike[str] | Iterable[str]) -> list[TraceRecord]:
    """Read a trace file (or an iterable of JSON lines); blank lines are skipped.

    A line that is not a trace record (negative or infinite numbers, an unknown source)
    raises :class:`~cvmfs_ml.errors.FormatError` naming its line number, so a wrong file is
    reported instead of summarised as garbage.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as handle:
            return load_trace(list(handle))
    records: list[TraceRecord] = []
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            data = jsontext.loads(line)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            source_kind = str(data.get("source", "hit"))
            if source_kind not in SOURCES:
                raise ValueError(f"source {source_kind!r} is not one of {', '.join(SOURCES)}")
            records.append(
                TraceRecord(
                    path=str(data["path"]),
                    offset=_count(data["offset"], "offset"),
                    length=_count(data["length"], "length"),
                    t=_finite(data.get("t", 0.0), "t"),
                    seconds=_finite(data.get("seconds", 0.0), "seconds"),
                    source=source_kind,
                    net_bytes=_count(data.get("net_bytes", 0), "net_bytes"),
                    size=None if data.get("size") is None else _count(data["size"], "size"),
                )
            )
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise FormatError(f"trace line {number}", f"not a trace record: {exc}") from None
    return records


def _count(value: object, name: str) -> int:
    """A byte count or offset: a whole number from 0 (a trace is outside input)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of bytes (0 or more), not {value!r}")
    return int(value)  # OverflowError for infinity


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def accesses_from_trace(
    records: Sequence[TraceRecord],
) -> tuple[dict[str, list[tuple[int, int, float]]], dict[str, int]]:
    """Per-file ``(offset, length, t)`` reads in time order and file sizes (for heat maps)."""
    accesses: dict[str, list[tuple[int, int, float]]] = {}
    sizes: dict[str, int] = {}
    for record in sorted((r for r in records if r.is_read), key=lambda r: r.t):
        accesses.setdefault(record.path, []).append((record.offset, record.length, record.t))
        if record.size is not None:
            sizes[record.path] = record.size
    return accesses, sizes


def _covered(spans: Iterable[tuple[int, int]]) -> int:
    """Bytes covered by at least one ``(offset, length)`` span (union of intervals)."""
    total = 0
    cur_start = cur_end = -1
    for start, end in sorted((o, o + n) for o, n in spans if n > 0):
        if start > cur_end:
            total += max(0, cur_end - cur_start)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + max(0, cur_end - cur_start)


def _file_stats(records: Sequence[TraceRecord], size: int | None) -> dict[str, Any]:
    reads = [r for r in records if r.is_read]
    lengths = [r.length for r in reads]
    sequential = 0
    prev_end = 0  # a first read at offset 0 starts a sequential scan
    for r in reads:
        if r.offset == prev_end:
            sequential += 1
        prev_end = r.offset + r.length
    unique = _covered((r.offset, r.length) for r in reads)
    read_bytes = sum(lengths)
    return {
        "read_count": len(reads),
        "bytes_read": read_bytes,
        "unique_bytes": unique,
        "file_size": size,
        "fraction_of_file": (unique / size) if size else None,
        "amplification": (read_bytes / unique) if unique else None,
        "sequential_fraction": (sequential / len(reads)) if reads else None,
        "median_read_size": float(statistics.median(lengths)) if lengths else None,
        "hits": sum(1 for r in reads if r.source == "hit"),
        "fetches": sum(1 for r in reads if r.source == "fetch"),
        "prefetches": sum(1 for r in records if r.source == "prefetch"),
        "net_bytes": sum(r.net_bytes for r in records),
        "read_seconds": sum(r.seconds for r in reads),
    }


def summarise_trace(
    records: Sequence[TraceRecord], sizes: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Per-file and total numbers of a trace: what was read, how, and what it cost.

    Per file (reads in time order): ``read_count``, ``bytes_read``, ``unique_bytes`` (covered at
    least once), ``file_size``, ``fraction_of_file``, ``amplification`` (bytes read / unique),
    ``sequential_fraction`` (reads starting where the previous read of the file ended),
    ``median_read_size`` (the keys of ``summarise_accesses``) plus ``hits``, ``fetches``,
    ``prefetches``, ``net_bytes`` and ``read_seconds``. ``total`` aggregates over files and adds
    ``pattern``: ``"sequential"`` when at least 80% of reads are sequential, ``"random"`` when at
    most 20% are, ``"mixed"`` otherwise.
    """
    by_file: dict[str, list[TraceRecord]] = {}
    known: dict[str, int] = dict(sizes or {})
    for record in sorted(records, key=lambda r: r.t):
        by_file.setdefault(record.path, []).append(record)
        if record.size is not None:
            known.setdefault(record.path, record.size)
    files = {name: _file_stats(recs, known.get(name)) for name, recs in by_file.items()}
    all_lengths = [r.length for r in records if r.is_read]
    count = sum(f["read_count"] for f in files.values())
    sequential = sum(
        f["sequential_fraction"] * f["read_count"] for f in files.values() if f["read_count"]
    )
    size_total = sum(known.get(name, 0) for name in files) if known else None
    unique = sum(f["unique_bytes"] for f in files.values())
    seq_fraction = (sequential / count) if count else None
    pattern = None
    if seq_fraction is not None:
        pattern = "sequential" if seq_fraction >= 0.8 else "random" if seq_fraction <= 0.2 else (
            "mixed"
        )
    times = [r.t for r in records]
    ends = [r.t + r.seconds for r in records]
    return {
        "files": files,
        "total": {
            "files": len(files),
            "read_count": count,
            "bytes_read": sum(all_lengths),
            "unique_bytes": unique,
            "file_size": size_total,
            "fraction_of_file": (unique / size_total) if size_total else None,
            "amplification": (sum(all_lengths) / unique) if unique else None,
            "sequential_fraction": seq_fraction,
            "median_read_size": float(statistics.median(all_lengths)) if all_lengths else None,
            "pattern": pattern,
            "hits": sum(f["hits"] for f in files.values()),
            "fetches": sum(f["fetches"] for f in files.values()),
            "prefetches": sum(f["prefetches"] for f in files.values()),
            "net_bytes": sum(f["net_bytes"] for f in files.values()),
            "wall_seconds": (max(ends) - min(times)) if times else 0.0,
        },
    }


def format_summary(summary: Mapping[str, Any], *, limit: int = 20) -> str:
    """A plain-text table of a :func:`summarise_trace` result (for terminals and reports)."""
    out = io.StringIO()
    total = summary["total"]
    mib = 1 << 20
    out.write(
        f"{total['files']} files, {total['read_count']} reads, "
        f"{total['bytes_read'] / mib:.1f} MiB read ({total['unique_bytes'] / mib:.1f} MiB unique"
    )
    if total.get("file_size"):
        out.write(f" of {total['file_size'] / mib:.1f} MiB")
    out.write(f"), {total['net_bytes'] / mib:.1f} MiB from the network\n")
    if total["read_count"]:
        out.write(
            f"pattern: {total['pattern']} ({total['sequential_fraction'] * 100:.0f}% sequential),"
            f" median read {total['median_read_size'] / 1024:.0f} KiB,"
            f" {total['hits']} hits / {total['fetches']} fetches,"
            f" {total['prefetches']} prefetched pieces\n"
        )
    out.write(f"{'reads':>7} {'MiB read':>9} {'size MiB':>9} {'%file':>6} {'seq%':>5}  path\n")
    files = sorted(summary["files"].items(), key=lambda kv: -kv[1]["bytes_read"])
    for name, f in files[:limit]:
        size = f["file_size"]
        fraction = f["fraction_of_file"]
        seq = f["sequential_fraction"]
        out.write(
            f"{f['read_count']:>7} {f['bytes_read'] / mib:>9.2f} "
            f"{(size / mib if size is not None else float('nan')):>9.2f} "
            f"{(fraction * 100 if fraction is not None else float('nan')):>6.1f} "
            f"{(seq * 100 if seq is not None else float('nan')):>5.0f}  {name}\n"
        )
    if len(files) > limit:
        out.write(f"... {len(files) - limit} more files\n")
    return out.getvalue()


def record_dict(record: TraceRecord) -> dict[str, Any]:
    """A record as the dictionary written to the file."""
    return asdict(record)
