"""``cvmfs-ml bench ...``: run the benchmark suite, compare two runs, make caches cold."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cvmfs_ml.cli.common import JsonOption, _fail, friendly, one_line

if TYPE_CHECKING:
    from cvmfs_ml.bench.profiles import Profile
    from cvmfs_ml.bench.zoo import ModelSpec

bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmark model loading from CVMFS against the alternatives."
)


def _split(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _user_models(arguments: list[str]) -> tuple[ModelSpec, ...]:
    """``--model`` arguments as specs with distinct names (a ``cvmfs://`` REF is fetched)."""
    from cvmfs_ml.bench.zoo import user_model, user_model_ref

    specs: list[ModelSpec] = []
    for text in arguments:
        if text.startswith("cvmfs://"):
            spec = user_model_ref(text)
        elif ":" in text and not Path(text).exists():
            raise _fail(f"--model {text}: a reference needs its repository: "
                        "cvmfs://<fqrn>/<namespace>/<name>:<version-or-alias>")
        else:
            spec = user_model(Path(text))
        taken = {s.name for s in specs}
        name, n = spec.name, 2
        while name in taken:
            name, n = f"{spec.name}-{n}", n + 1
        specs.append(spec if name == spec.name else replace(spec, name=name))
    return tuple(specs)


def chosen_profile(
    chosen: Profile,
    *,
    models: str | None = None,
    model: list[str] | None = None,
    modes: str | None = None,
    states: str | None = None,
    networks: str | None = None,
    repeats: int | None = None,
) -> Profile:
    """``chosen`` narrowed by ``bench run``'s options; bad names fail here, before any build."""
    from cvmfs_ml.bench.profiles import choices

    changes: dict[str, object] = {}
    if (names := _split(models)) is not None:
        known = {m.name for m in chosen.models}
        unknown = sorted(set(names) - known)
        if unknown:
            raise _fail(f"unknown models {unknown}; the profile has {sorted(known)}")
        changes["models"] = tuple(m for m in chosen.models if m.name in names)
        changes["access_models"] = tuple(m for m in chosen.access_models if m.name in names)
        if chosen.concurrency_model not in names:  # the Squid experiment is a model of its own
            changes["concurrency"] = ()
    if model:
        if models:
            raise _fail("--model and --models exclude each other")
        chosen_models = _user_models(model)
        changes["models"] = chosen_models
        changes["access_models"] = chosen_models
        changes["network_models"] = tuple(m.name for m in chosen_models)
        changes["concurrency"] = ()
    allowed = choices()
    for field, value in (("modes", modes), ("states", states), ("networks", networks)):
        if (items := _split(value)) is not None:
            if unknown := sorted(set(items) - allowed[field]):
                known = ", ".join(sorted(allowed[field]))
                raise _fail(f"unknown {field} {unknown}; known: {known}")
            changes[field] = items
    if repeats is not None:
        if repeats < 1:
            raise _fail("--repeats must be at least 1")
        changes["repeats"] = repeats
    return chosen.with_(**changes)


@bench_app.command("run")
@friendly
def bench_run(
    profile: Annotated[str, typer.Option(help="short (CI, < 3 min) or full (2 GB)")] = "short",
    out: Annotated[str, typer.Option("--out", help="report folder")] = "bench-results",
    work: Annotated[
        Path | None,
        typer.Option(
            "--work",
            help="models, repository and caches; reused between runs (default OUT/work)",
        ),
    ] = None,
    modes: Annotated[
        str | None,
        typer.Option(help="comma list: local,fuse,fsspec,upstream,get,path,download,oci"),
    ] = None,
    models: Annotated[str | None, typer.Option(help="comma list of the profile's models")] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="measure this model instead of the profile's (repeatable): an ONNX, "
            "safetensors or PyTorch file, a folder with one .onnx, a Hugging Face folder, "
            "or a published version cvmfs://<fqrn>/<ns>/<name>:<version-or-alias>",
        ),
    ] = None,
    states: Annotated[str | None, typer.Option(help="comma list: cold,warm,hot")] = None,
    networks: Annotated[
        str | None,
        typer.Option(
            help="comma list: loopback,lan-1ms-10g,wan-20ms,wan-20ms-1g,wan-100ms-100m,"
            "wan-20ms-cap84MBps"
        ),
    ] = None,
    repeats: Annotated[int | None, typer.Option(help="measurements per scenario")] = None,
    mounted: Annotated[
        Path | None,
        typer.Option(
            "--mounted", help="also measure models at DIR/<model> (e.g. an upstream /cvmfs mount)"
        ),
    ] = None,
    global_drop: Annotated[
        bool,
        typer.Option(
            "--global-drop", help="also drop the whole page cache before cold runs (root)"
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
) -> None:
    """Run a benchmark profile; writes OUT/results.json, results.csv, summary.md and plots."""
    from cvmfs_ml.bench.runner import PROFILES, run_profile
    from cvmfs_ml.models.refs import local_dest

    report = local_dest(out, "--out")
    if profile not in PROFILES:
        raise _fail(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    chosen = chosen_profile(PROFILES[profile], models=models, model=model, modes=modes,
                            states=states, networks=networks, repeats=repeats)

    def log(message: str) -> None:
        if not quiet:
            typer.echo(message, err=True)

    doc = run_profile(chosen, report, workdir=work, log=log, global_drop=global_drop,
                      mounted=mounted)  # fmt: skip
    failed = [name for name, check in doc["checks"].items() if not check["ok"]]
    typer.echo(
        f"wrote {report / 'results.json'}, {report / 'summary.md'} "
        f"({len(doc['measurements'])} measurements in {doc['seconds']:.0f} s)"
    )
    measured = doc["measurements"]
    if measured and not any(m.get("ok") for m in measured):
        # Nothing was measured (a model no loader can read, say): one line and exit 1, not the
        # same error once per cell and a report of failures with exit 0.
        first = measured[0]
        cell = f"{first['model']}/{first['mode']}/{first['network']}/{first['cache_state']}"
        reason = str(first.get("error") or "failed").split(". ")[0]
        raise _fail(f"all {len(measured)} measurements failed; the first ({cell}): {reason}")
    for name in failed:
        typer.echo(one_line(f"check failed: {name}: {doc['checks'][name]['detail']}"), err=True)
    for error in doc["errors"]:
        typer.echo(one_line(f"error: {error}"), err=True)


@bench_app.command("compare")
@friendly
def bench_compare(
    baseline: Annotated[Path, typer.Argument(help="results.json of the reference run")],
    new: Annotated[Path, typer.Argument(help="results.json of the run to check")],
    threshold: Annotated[
        float, typer.Option(help="relative change that counts as a regression (0.25 = 25% worse)")
    ] = 0.25,
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="compare only these metrics (repeatable)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Exit 1 when NEW is worse than BASELINE beyond the threshold in any scenario."""
    from cvmfs_ml.bench.compare import compare_files

    try:
        report = compare_files(baseline, new, threshold=threshold, metrics=metric)
    except ValueError as exc:
        raise _fail(str(exc), 2) from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "threshold": report.threshold,
                    "regressions": [d.__dict__ for d in report.regressions],
                    "improvements": [d.__dict__ for d in report.improvements],
                    "failures": report.failures,
                    "missing": report.missing,
                    "added": report.added,
                },
                default=str,
            )
        )
    else:
        typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


@bench_app.command("export")
@friendly
def bench_export(
    results: Annotated[Path, typer.Argument(help="results.json of a `bench run`")],
    fmt: Annotated[
        str, typer.Option("--format", help="cvmfs-ci: the CSV of CVMFS's continuous benchmarking")
    ] = "cvmfs-ci",
    out: Annotated[
        Path | None, typer.Option("--out", help="CSV file to write (default: standard output)")
    ] = None,
) -> None:
    """Write a run's results in another tool's layout (one row per workload and metric)."""
    import sys

    from cvmfs_ml.bench.export import cvmfs_ci_rows, write_cvmfs_ci
    from cvmfs_ml.bench.report import load_results
    from cvmfs_ml.errors import FormatError

    if fmt != "cvmfs-ci":
        raise _fail(f"unknown --format {fmt!r}; known: cvmfs-ci")
    try:
        doc = load_results(results)
    except (OSError, UnicodeDecodeError, FormatError) as exc:
        raise _fail(f"cannot read {results}: {exc}; pass the results.json of a `bench run`"
                    ) from exc  # fmt: skip
    rows = cvmfs_ci_rows(doc)
    if out is None:
        write_cvmfs_ci(rows, sys.stdout)
        return
    with open(out, "w", newline="") as f:
        count = write_cvmfs_ci(rows, f)
    typer.echo(f"wrote {count} rows to {out}", err=True)


@bench_app.command("sweep")
@friendly
def bench_sweep(
    size_mib: Annotated[
        int, typer.Option("--size-mib", min=1, help="LLM-shaped model size")
    ] = 2048,
    chunks: Annotated[str, typer.Option(
        help="comma list of MIN/AVG/MAX chunk sizes in MiB, or 'off'")] = "4/8/16,16/32/64",
    compression: Annotated[str, typer.Option(help="comma list: zlib,none,auto")] = "zlib,none",
    fraction: Annotated[float, typer.Option(
        help="share of the bytes the simulated fine-tune changes")] = 0.05,
    load_mode: Annotated[str, typer.Option(help="fuse | fsspec")] = "fuse",
    repeats: Annotated[int, typer.Option(min=1, help="cold loads per point")] = 1,
    out: Annotated[str, typer.Option("--out")] = "bench-results/sweep",
    work: Annotated[Path | None, typer.Option("--work")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Publish time, repository size, cold load and fine-tune dedup per chunk/compression."""
    from cvmfs_ml.bench.runner import default_workdir
    from cvmfs_ml.bench.sweep import parse_points, run_sweep
    from cvmfs_ml.bench.zoo import ModelSpec
    from cvmfs_ml.models.refs import local_dest

    report = local_dest(out, "--out")
    if load_mode not in ("fuse", "fsspec"):
        raise _fail("--load-mode must be fuse or fsspec")
    if not 0 <= fraction <= 1:  # written so that NaN fails too
        raise _fail(f"--fraction must be within 0..1, not {fraction:g}")
    spec = ModelSpec(f"llm-{size_mib}m", "llm", size=size_mib * 2**20, dtype="float32")
    doc = run_sweep(spec, parse_points(chunks, compression), report,
                    workdir=work or default_workdir(report), fine_tune_fraction=fraction,
                    load_mode=load_mode, repeats=repeats,
                    log=(lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True)))
    typer.echo(f"wrote {report / 'sweep.md'} ({len(doc['points'])} points in "
               f"{doc['seconds']:.0f} s)")  # fmt: skip


@bench_app.command("drop-caches")
@friendly
def bench_drop_caches(
    cache: Annotated[
        list[Path] | None,
        typer.Option(
            "--cache", help="cvmfs-ml cache folder to wipe (repeatable; default: CVMFS_CACHE_BASE)"
        ),
    ] = None,
    path: Annotated[
        list[Path] | None,
        typer.Option(
            "--path", help="also evict these files/folders from the page cache (repeatable)"
        ),
    ] = None,
    wipe: Annotated[
        bool,
        typer.Option(
            "--wipe/--no-wipe", help="delete the cache contents (not only their page cache)"
        ),
    ] = True,
    global_drop: Annotated[
        bool | None,
        typer.Option(
            "--global/--no-global", help="echo 1 > /proc/sys/vm/drop_caches (default: when root)"
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Make the next load cold: wipe client caches, upstream's too, and drop page caches.

    Unmount cvmfs-ml mounts that use a cache before wiping it.
    """
    from cvmfs_ml.bench.caches import drop_page_cache, wipe_cvmfs_ml_cache, wipe_upstream_cache

    caches = list(cache or [])
    if not caches:
        from cvmfs_ml.client.config import load_config

        caches = [load_config(None).cache_base]
    freed = 0
    if wipe:
        for folder in caches:
            freed += wipe_cvmfs_ml_cache(folder)
    upstream = wipe_upstream_cache() if wipe else False
    do_global = (os.geteuid() == 0) if global_drop is None else global_drop
    if do_global and os.geteuid() != 0:
        raise _fail("--global needs root (it writes /proc/sys/vm/drop_caches)")
    result = drop_page_cache([*caches, *(path or [])], global_drop=do_global)
    summary = {
        "caches": [str(c) for c in caches],
        "bytes_freed": freed,
        "upstream_wiped": upstream,
        "files_evicted": result.files,
        "files_failed": result.failed,
        "global_drop": result.global_dropped,
    }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(
            f"wiped {len(caches) if wipe else 0} cache(s) ({freed / 2**20:.1f} MiB), "
            f"upstream: {'wiped' if upstream else 'not installed' if wipe else 'kept'}, "
            f"page cache: {result.files} files evicted"
            + (", whole page cache dropped" if result.global_dropped else "")
        )


__all__ = ["bench_app"]
