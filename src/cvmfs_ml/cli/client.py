"""``cvmfs-ml mount | umount | reload | stats | warm | trace report``: reading as a client.

Register with :func:`register_client_commands` (``cli/__init__.py``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer

from cvmfs_ml.cli.common import (
    BlacklistOption,
    JsonOption,
    KeyOption,
    _fail,
    friendly,
    one_line,
    use_blacklist,
)

__all__ = ["register_client_commands", "trace_app"]

trace_app = typer.Typer(no_args_is_help=True, help="Turn read traces into numbers and pictures.")

CacheOption = Annotated[
    Path | None, typer.Option("--cache", help="object cache folder (default: CVMFS_CACHE_BASE)")
]
ProxyOption = Annotated[
    str | None, typer.Option("--proxy", help="proxies in CVMFS_HTTP_PROXY syntax, e.g. DIRECT")
]
ConfigOption = Annotated[
    list[Path] | None,
    typer.Option("--config", help="client configuration file (KEY=value, upstream syntax)"),
]
ParallelOption = Annotated[
    int | None, typer.Option("--parallel", "-j", min=1, help="pieces fetched at once")
]

_MiB = float(1 << 20)


def _configs(config: list[Path] | None) -> list[str]:
    return [str(p) for p in config or []]


# -- mount ---------------------------------------------------------------------------------------
@friendly
def mount_command(
    target: Annotated[
        str, typer.Argument(help="http(s)://.../cvmfs/<fqrn>, repository folder or FQRN")
    ],
    mountpoint: Annotated[Path, typer.Argument(help="an existing empty folder")],
    key: KeyOption = None,
    cache: CacheOption = None,
    proxy: ProxyOption = None,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="record every read to this JSON-lines file")
    ] = None,
    detach: Annotated[bool, typer.Option("-d", "--detach", help="return once mounted")] = False,
    config: ConfigOption = None,
    tag: Annotated[str | None, typer.Option("--tag", help="mount this tag")] = None,
    allow_other: Annotated[
        bool | None, typer.Option("--allow-other/--no-allow-other", help="default: when root")
    ] = None,
    readahead_kb: Annotated[
        int, typer.Option("--readahead-kb", help="kernel readahead (1024 = 1 MiB requests)")
    ] = 1024,
    parallel: ParallelOption = None,
    log: Annotated[Path | None, typer.Option("--log", help="daemon log file (with -d)")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="log every FUSE request")] = False,
    nonempty: Annotated[
        bool, typer.Option("--nonempty", help="mount over a folder that holds files (hides them)")
    ] = False,
    blacklist: BlacklistOption = None,
) -> None:
    """Mount a repository read-only; a FQRN takes servers and keys from the configuration.

    Without -d the command serves until unmounted (Ctrl-C or `cvmfs-ml umount`).
    """
    from cvmfs_ml.client.fuse import mount
    from cvmfs_ml.client.fuse_daemon import run_foreground

    use_blacklist(blacklist)
    if not mountpoint.is_dir():
        raise _fail(f"mount point {mountpoint} is not a directory")
    common: dict[str, Any] = {
        "public_key": str(key) if key else None,
        "cache": str(cache) if cache else None,
        "proxy": proxy,
        "config_files": _configs(config),
        "trace": str(trace) if trace else None,
        "tag": tag,
        "allow_other": allow_other,
        "readahead_kb": readahead_kb,
        "prefetch_workers": parallel,
        "nonempty": nonempty,
    }
    if detach:
        handle = mount(target, mountpoint, log_file=log, **common)
        typer.echo(f"mounted {target} at {handle.mountpoint} (pid {handle.pid})")
        return

    def ready() -> None:
        typer.echo(f"mounted {target} at {mountpoint.resolve()}; Ctrl-C to unmount", err=True)

    run_foreground(target, str(mountpoint), debug=debug, ready=ready, **common)


@friendly
def umount_command(
    mountpoint: Annotated[Path, typer.Argument(help="where the repository is mounted")],
    lazy: Annotated[bool, typer.Option("--lazy", "-z", help="detach even if busy")] = False,
) -> None:
    """Unmount a cvmfs-ml (or any FUSE) mount; the daemon then exits."""
    from cvmfs_ml.client.fuse import is_mounted, unmount

    if not is_mounted(mountpoint):
        raise _fail(f"{mountpoint} is not mounted")
    try:
        unmount(mountpoint, lazy=lazy)
    except OSError as exc:
        raise _fail(f"cannot unmount {mountpoint}: {exc.strerror or exc}") from exc
    typer.echo(f"unmounted {mountpoint}")


# -- reload, stats -------------------------------------------------------------------------------
@friendly
def reload_command(
    mountpoint: Annotated[Path, typer.Argument(help="where the repository is mounted")],
    as_json: JsonOption = False,
) -> None:
    """Check for a new revision now instead of when the TTL expires (like cvmfs_talk remount).

    Exits 1 when the check fails; the mount then stays on its revision and keeps serving.
    """
    from cvmfs_ml.client.mount_control import reload_mount

    result = reload_mount(mountpoint)
    if as_json:
        typer.echo(json.dumps(result))
    if not result.get("ok"):
        raise _fail(
            f"reload of {mountpoint} failed: {result.get('error')}; still serving revision "
            f"{result.get('revision')}"
        )
    if as_json:
        return
    if result.get("pinned"):
        typer.echo(f"{mountpoint}: pinned at revision {result.get('revision')}; it does not move")
    elif result.get("changed"):
        typer.echo(f"{mountpoint}: revision {result.get('previous')} -> {result.get('revision')}")
    else:
        typer.echo(f"{mountpoint}: revision {result.get('revision')} is the newest")


@friendly
def stats_command(
    mountpoint: Annotated[Path, typer.Argument(help="where the repository is mounted")],
    as_json: JsonOption = False,
    internal_affairs: Annotated[
        bool,
        typer.Option(
            "--internal-affairs",
            help="upstream's `cvmfs_talk internal affairs` layout (Name|Value|Description), "
            "for tools that parse it such as CVMFS's benchmark harness",
        ),
    ] = False,
) -> None:
    """The mount daemon's counters: fetches, cache hits, refreshes, failovers (internal affairs)."""
    from cvmfs_ml.client.mount_control import read_mount_stats

    stats = read_mount_stats(mountpoint)
    if internal_affairs:
        from cvmfs_ml.bench.export import internal_affairs as affairs

        typer.echo(affairs(stats), nl=False)
        return
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    for key, value in stats.items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for name, item in value.items():
                typer.echo(f"  {name}: {item}")
        else:
            typer.echo(f"{key}: {value}")


# -- warm ----------------------------------------------------------------------------------------
def _is_repository(target: str) -> bool:
    if target.startswith(("http://", "https://")):
        return True
    path = Path(target)
    return (path / ".cvmfspublished").is_file() or not path.exists()


def _warm_mounted(path: Path, parallel: int) -> dict[str, Any]:
    """Warm a path inside a mount: ask our daemon (magic xattr), else read every file."""
    from cvmfs_ml.client.fuse import WARM_XATTR

    started = time.monotonic()
    try:
        fields = os.getxattr(path, WARM_XATTR.decode()).decode().split()
        files, size, fetched, net = (int(x) for x in fields[:4])
        return {"files": files, "bytes": size, "fetched_pieces": fetched, "net_bytes": net,
                "seconds": time.monotonic() - started, "how": "daemon"}  # fmt: skip
    except OSError:
        pass  # another file system (upstream cvmfs2, a local copy): read it all instead
    targets = [path] if path.is_file() else [
        Path(root) / name for root, _, names in os.walk(path) for name in names
    ]  # fmt: skip
    lock = threading.Lock()
    total = [0]

    def read_all(file: Path) -> None:
        count = 0
        try:
            with open(file, "rb", buffering=0) as handle:
                buffer = bytearray(1 << 20)
                while n := handle.readinto(buffer):
                    count += n
        except OSError as exc:
            typer.echo(f"cvmfs-ml: {one_line(f'warm: {file}: {exc.strerror or exc}')}", err=True)
        with lock:
            total[0] += count

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(read_all, [t for t in targets if t.is_file()]))
    return {"files": len(targets), "bytes": total[0], "fetched_pieces": None, "net_bytes": None,
            "seconds": time.monotonic() - started, "how": "read"}  # fmt: skip


@friendly
def warm_command(
    target: Annotated[
        str, typer.Argument(help="repository (URL, folder, FQRN), or a path in a mount")
    ],
    path: Annotated[
        str | None, typer.Argument(help="file or folder inside the repository (default /)")
    ] = None,
    key: KeyOption = None,
    cache: CacheOption = None,
    proxy: ProxyOption = None,
    config: ConfigOption = None,
    parallel: ParallelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fetch every piece of a file or folder (a whole model) into the cache, in parallel.

    `cvmfs-ml warm REPO /models/x/y/1` fills the local object cache;
    `cvmfs-ml warm /cvmfs/<fqrn>/models/x/y/1` warms a mounted path.
    """
    if path is None and not _is_repository(target):
        result = _warm_mounted(Path(target), parallel or 8)
    else:
        from cvmfs_ml.client.locate import open_target
        from cvmfs_ml.client.prefetch import warm

        repo = open_target(
            target, public_key=str(key) if key else None, cache=str(cache) if cache else None,
            proxy=proxy, config_files=_configs(config),
        )  # fmt: skip
        with repo:
            done = warm(repo, path or "/", parallel=parallel)
        result = {
            "files": done.files,
            "bytes": done.bytes,
            "fetched_pieces": done.fetched,
            "net_bytes": done.net_bytes,
            "seconds": done.seconds,
            "how": "prefetch",
        }
    if as_json:
        typer.echo(json.dumps(result))
        return
    seconds = max(result["seconds"], 1e-9)
    line = (
        f"warmed {result['files']} files, {result['bytes']} bytes"
        f" ({result['bytes'] / _MiB:.1f} MiB) in {result['seconds']:.2f} s"
        f" ({result['bytes'] / _MiB / seconds:.0f} MiB/s)"
    )
    if result["net_bytes"] is not None:
        line += f"; {result['fetched_pieces']} pieces, {result['net_bytes']} bytes fetched"
    typer.echo(line)


# -- trace ---------------------------------------------------------------------------------------
@trace_app.command("report")
@friendly
def trace_report(
    trace: Annotated[Path, typer.Argument(help="trace file written by mount --trace")],
    out: Annotated[Path, typer.Option("--out", help="folder for summary.json and heatmap.png")],
    title: Annotated[str | None, typer.Option("--title", help="heat map title")] = None,
    as_json: JsonOption = False,
) -> None:
    """Summarise a read trace and draw its access heat map (DIR/heatmap.png)."""
    from cvmfs_ml.bench.heatmap import plot_heatmap
    from cvmfs_ml.client.trace import (
        accesses_from_trace,
        format_summary,
        load_trace,
        summarise_trace,
    )

    try:
        records = load_trace(trace)
    except ValueError as exc:
        raise _fail(f"{trace}: {exc}") from exc
    if not records:
        raise _fail(f"{trace}: no reads recorded")
    summary = summarise_trace(records)
    accesses, sizes = accesses_from_trace(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary)
    (out / "summary.txt").write_text(text)
    if accesses:
        with warnings.catch_warnings():  # names in scripts the font lacks: boxes, not noise
            warnings.simplefilter("ignore", UserWarning)
            plot_heatmap(accesses, sizes, out / "heatmap.png", title or f"reads in {trace.name}")
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        sys.stdout.write(text)
        typer.echo(f"wrote {out / 'summary.json'}" + (
            f" and {out / 'heatmap.png'}" if accesses else ""))  # fmt: skip


def register_client_commands(app: typer.Typer) -> None:
    """Add ``mount``, ``umount``, ``reload``, ``stats``, ``warm`` and ``trace`` to the main app."""
    app.command("mount")(mount_command)
    app.command("umount")(umount_command)
    app.command("reload")(reload_command)
    app.command("stats")(stats_command)
    app.command("warm")(warm_command)
    app.add_typer(trace_app, name="trace")
