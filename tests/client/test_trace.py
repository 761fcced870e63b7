"""Read tracing: the recorder, the summary, and traces written by a real Repository."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.client.trace import (
    Tracer,
    TraceRecord,
    accesses_from_trace,
    format_summary,
    load_trace,
    summarise_trace,
)

REF = "ref.test.local"
MiB = 1 << 20


def _record(path: str, offset: int, length: int, t: float, **kw: object) -> TraceRecord:
    return TraceRecord(path=path, offset=offset, length=length, t=t, seconds=0.001, **kw)  # type: ignore[arg-type]


def test_tracer_is_thread_safe_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    tracer = Tracer(out, flush_every=7)

    def work(n: int) -> None:
        for i in range(200):
            tracer.record(f"/f{n}", i * 10, 10, 0.0001, source="fetch" if i % 2 else "hit",
                          net_bytes=i, size=2000)  # fmt: skip

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tracer.close()
    records = load_trace(out)
    assert len(records) == 8 * 200 == tracer.count
    assert {r.path for r in records} == {f"/f{n}" for n in range(8)}
    per_file = [r for r in records if r.path == "/f3"]
    assert sorted(r.offset for r in per_file) == [i * 10 for i in range(200)]
    assert sum(r.net_bytes for r in per_file) == sum(range(200))
    assert {r.source for r in per_file} == {"hit", "fetch"}


def test_tracer_rejects_unknown_source(tmp_path: Path) -> None:
    with Tracer(tmp_path / "t.jsonl") as tracer, pytest.raises(ValueError, match="source"):
        tracer.record("/x", 0, 1, 0.0, source="maybe")


def test_load_trace_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"path": "/a", "offset": 0, "length": 4}) + "\n\nnot json\n")
    with pytest.raises(ValueError, match="line 3"):
        load_trace(path)


@pytest.mark.parametrize(
    "line",
    ['{"path": "/a", "offset": 1e400, "length": 1}',  # infinity: OverflowError before
     '{"path": "/a", "offset": -5, "length": 1}', '{"path": "/a", "offset": 0, "length": -1}',
     '{"path": "/a", "offset": 0, "length": 1, "t": NaN}',
     '{"path": "/a", "offset": 0, "length": 1, "source": "weird"}',
     '{"path": "/a", "offset": "0", "length": 1}', '[1, 2]', "[" * 100_000],
)  # fmt: skip
def test_load_trace_refuses_what_no_client_writes(tmp_path: Path, line: str) -> None:
    """Before, these were summarised as garbage (negative spans, NaN times) or raised
    ``OverflowError``/``RecursionError``, which ``trace report`` showed as a traceback."""
    from cvmfs_ml.errors import FormatError

    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"path": "/a", "offset": 0, "length": 4}) + "\n" + line + "\n")
    with pytest.raises(FormatError, match="trace line 2"):
        load_trace(path)


def test_summary_tells_sequential_from_random() -> None:
    seq = [_record("/seq", i * MiB, MiB, float(i), size=8 * MiB) for i in range(8)]
    order = [5, 1, 7, 3, 0, 6, 2, 4]
    rnd = [_record("/rnd", o * 4096, 4096, 10.0 + i, size=MiB) for i, o in enumerate(order)]
    rnd.append(_record("/rnd", 5 * 4096, 4096, 30.0, size=MiB))  # a re-read
    prefetch = [_record("/seq", 0, 8 * MiB, 0.0, source="prefetch", net_bytes=8 * MiB + 5)]
    summary = summarise_trace(seq + rnd + prefetch)
    files = summary["files"]
    assert files["/seq"]["sequential_fraction"] == 1.0
    assert files["/seq"]["fraction_of_file"] == 1.0
    assert files["/seq"]["read_count"] == 8  # the prefetch is not a read
    assert files["/seq"]["prefetches"] == 1
    assert files["/seq"]["net_bytes"] == 8 * MiB + 5
    assert files["/rnd"]["sequential_fraction"] < 0.4
    assert files["/rnd"]["unique_bytes"] == 8 * 4096
    assert files["/rnd"]["bytes_read"] == 9 * 4096
    assert files["/rnd"]["amplification"] == pytest.approx(9 / 8)
    assert files["/rnd"]["fraction_of_file"] == pytest.approx(8 * 4096 / MiB)
    total = summary["total"]
    assert total["read_count"] == 17
    assert total["file_size"] == 9 * MiB
    assert total["pattern"] in {"mixed", "sequential"}
    only_random = summarise_trace(rnd)["total"]
    assert only_random["pattern"] == "random"
    text = format_summary(summary)
    assert "/seq" in text and "/rnd" in text and "sequential" in text


def test_accesses_from_trace_feeds_the_heatmap() -> None:
    records = [
        _record("/a", 100, 10, 2.0, size=1000),
        _record("/a", 0, 10, 1.0, size=1000),
        _record("/a", 0, 1000, 0.5, source="prefetch"),
    ]
    accesses, sizes = accesses_from_trace(records)
    assert accesses == {"/a": [(0, 10, 1.0), (100, 10, 2.0)]}
    assert sizes == {"/a": 1000}


@pytest.fixture
def traced_repo(reference_repo: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    tracer = Tracer(tmp_path / "trace.jsonl")
    repo = Repository.open(
        reference_repo / "cvmfs" / REF,
        public_key=reference_repo / "keys" / f"{REF}.pub",
        cache=tmp_path / "cache",
        tracer=tracer,
    )
    yield repo, tracer
    repo.close()
    tracer.close()


def test_repository_reads_are_traced_with_hit_fetch_and_store_bytes(traced_repo, reference_repo):  # type: ignore[no-untyped-def]
    repo, tracer = traced_repo
    repo.readahead_pieces = 0  # only the reader's own fetches, so the numbers are exact
    path = "/big/random-24MiB.bin"
    layout = repo.layout(path)
    first = layout.pieces[0]
    with repo.open_file(path, prefetch=False) as handle:
        assert len(handle.pread(1000, 10)) == 1000  # cold: fetches piece 0
        assert len(handle.pread(1000, 2000)) == 1000  # same piece: a hit
    tracer.flush()
    records = load_trace(tracer.path)  # type: ignore[arg-type]
    seen = [(r.offset, r.length, r.source) for r in records]
    assert seen == [(10, 1000, "fetch"), (2000, 1000, "hit")]
    stored = (reference_repo / "cvmfs" / REF / "data" / first.digest.hex[:2]
              / (first.digest.hex[2:] + "P"))  # fmt: skip
    assert records[0].net_bytes == stored.stat().st_size  # the compressed object's size
    assert records[1].net_bytes == 0
    assert all(r.size == layout.size and r.path == path for r in records)


def test_prefetch_is_traced_separately(traced_repo) -> None:  # type: ignore[no-untyped-def]
    repo, tracer = traced_repo
    covered = repo.prefetch("/big")
    assert covered == 25165824
    tracer.flush()
    records = load_trace(tracer.path)  # type: ignore[arg-type]
    assert records and all(r.source == "prefetch" for r in records)
    assert len(records) == len(repo.layout("/big/random-24MiB.bin").pieces)
    assert sum(r.length for r in records) == covered
    assert all(r.net_bytes > 0 for r in records)
    summary = summarise_trace(records)
    assert summary["total"]["read_count"] == 0
    assert summary["total"]["prefetches"] == len(records)


def test_trace_report_command_writes_png_and_summary(tmp_path: Path) -> None:
    from cvmfs_ml.cli.client import register_client_commands

    trace = tmp_path / "trace.jsonl"
    with Tracer(trace) as tracer:
        for i in range(16):
            tracer.record("/models/m/1/model.onnx.data", i * MiB, MiB, 0.001, size=16 * MiB,
                          source="fetch" if i < 4 else "hit", t=100.0 + i)  # fmt: skip
        tracer.record("/models/m/1/model.onnx", 0, 4096, 0.001, size=4096, t=99.0)
    app = typer.Typer()
    register_client_commands(app)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["trace", "report", str(trace), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "17 reads" in result.output
    png = out / "heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    data = summary["files"]["/models/m/1/model.onnx.data"]
    assert data["read_count"] == 16 and data["fraction_of_file"] == 1.0
    assert data["fetches"] == 4 and data["hits"] == 12
    bad = CliRunner().invoke(app, ["trace", "report", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code != 0
