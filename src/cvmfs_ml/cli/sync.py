"""``cvmfs-ml sync WISHLIST --repo REPO [--loop] [--interval S]``: registries -> repository."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cvmfs_ml.cli.common import (
    MAX_BYTES_HELP,
    MAX_UNPACKED_HELP,
    REPO_HELP,
    friendly,
    one_line,
    open_publisher,
)
from cvmfs_ml.cli.s3 import S3ConfigOption
from cvmfs_ml.models.sources.limits import MAX_BYTES, MAX_CATALOGS, MAX_MEMBERS


class _Progress:
    """Errors as lines on stderr; on a terminal, a live status line with the current step."""

    def __init__(self, live: bool) -> None:
        self.status: Any = None
        self.console: Any = None
        if live:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False)
            self.status = self.console.status("sync: starting")

    def __enter__(self) -> _Progress:
        if self.status is not None:
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(None, None, None)

    def __call__(self, event: Any) -> None:
        if event.error:
            line = one_line(f"error: {event.action} {event.image}: {event.error}")
            if self.console is not None:
                self.console.print(line, markup=False)  # above the live status line
            else:
                typer.echo(line, err=True)
        elif self.status is not None:
            what = event.image or event.public_path or event.extra.get("model", "")
            self.status.update(f"sync: {event.action} {what}".rstrip())


def _summary(report: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report.to_json(), sort_keys=True))
        return
    if report.committed:
        what = f"revision {report.revision_before} -> {report.revision_after}"
    else:
        what = f"no new revision (still {report.revision_after})"
    errors = f", {report.errors} error(s)" if report.errors else ""
    freed = f", gc removed {report.gc_removed} object(s)" if report.gc_removed else ""
    typer.echo(f"sync: {what}, {report.changes} change(s){errors}{freed}, {report.seconds:.1f} s")


@friendly
def sync_command(
    wishlist: Annotated[Path, typer.Argument(help="DUCC v1 wishlist YAML (+ 'models:')")],
    repo: Annotated[str, typer.Option("--repo", help=REPO_HELP)],
    loop: Annotated[bool, typer.Option("--loop", help="keep syncing every --interval")] = False,
    interval: Annotated[float, typer.Option("--interval", help="seconds between rounds")] = 300.0,
    keys: Annotated[Path | None, typer.Option("--keys", help="keys folder")] = None,
    s3_config: S3ConfigOption = None,
    events: Annotated[
        Path | None, typer.Option("--events", "-n", help="append JSON-lines events here")
    ] = None,
    grace_period: Annotated[
        float, typer.Option("--grace-period", help="seconds before an unwanted image goes")
    ] = 7 * 86400.0,
    plain_http: Annotated[
        bool, typer.Option("--plain-http", help="HTTP for references without a scheme")
    ] = False,
    auth_file: Annotated[
        Path | None, typer.Option("--auth-file", help="docker/oras auth file (config.json)")
    ] = None,
    platform: Annotated[str, typer.Option("--platform")] = "linux/amd64",
    no_gc: Annotated[bool, typer.Option("--no-gc", help="never garbage collect")] = False,
    layers: Annotated[
        bool, typer.Option("--layers", help="also /.layers/ and podmanStore/ (DUCC's layout)")
    ] = False,
    webhook_port: Annotated[
        int | None,
        typer.Option("--webhook-port", min=0, max=65535,
                     help="with --loop: listen for notifications"),
    ] = None,
    webhook_host: Annotated[str, typer.Option("--webhook-host")] = "127.0.0.1",
    webhook_token: Annotated[
        str | None, typer.Option("--webhook-token", envvar="CVMFS_ML_WEBHOOK_TOKEN")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, help="with --loop: stop after N rounds")
    ] = None,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help=MAX_BYTES_HELP)
    ] = MAX_BYTES,
    max_unpacked_bytes: Annotated[
        int | None, typer.Option("--max-unpacked-bytes", min=1, help=MAX_UNPACKED_HELP)
    ] = None,
    max_members: Annotated[
        int,
        typer.Option(
            "--max-members",
            min=1,
            help="refuse an image whose layers hold more tar members than this",
        ),
    ] = MAX_MEMBERS,
    max_catalogs: Annotated[
        int,
        typer.Option(
            "--max-catalogs",
            min=0,
            help="refuse an image whose layers hold more .cvmfscatalog files (each one a nested"
            " catalog) than this",
        ),
    ] = MAX_CATALOGS,
    scratch: Annotated[
        Path | None,
        typer.Option(
            "--scratch",
            help="folder where image layers and model files are unpacked before they are"
            " published (created if missing; each round's files are removed as it ends;"
            " default: the system's temporary folder, TMPDIR)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON report per round")] = False,
) -> None:
    """Sync images (unpacked, DUCC layout) and model artifacts (versions) into REPO."""
    from cvmfs_ml.errors import ConfigError
    from cvmfs_ml.sync.auth import AuthFile
    from cvmfs_ml.sync.engine import SyncOptions, check_target
    from cvmfs_ml.sync.events import EventLog
    from cvmfs_ml.sync.loop import SyncLoop
    from cvmfs_ml.sync.wishlist import load_wishlist

    if not interval > 0 or not grace_period >= 0:  # written so that NaN fails too
        raise ConfigError("--interval must be above 0 and --grace-period at least 0 (seconds)")
    if webhook_port is not None and not loop:
        raise ConfigError("--webhook-port needs --loop")
    wanted = load_wishlist(wishlist)  # a broken wishlist fails before anything starts
    if scratch is not None:
        _check_scratch(scratch)  # so does a scratch folder that cannot be written
    publisher = open_publisher(repo, keys, s3_config)
    check_target(wanted, publisher)  # and one for another repository
    options = SyncOptions(
        plain_http=plain_http,
        grace_seconds=grace_period,
        gc=not no_gc,
        platform=platform,
        auth=AuthFile.load(auth_file),
        layers=layers,
        max_bytes=max_bytes,
        max_unpacked_bytes=max_unpacked_bytes,
        max_members=max_members,
        max_catalogs=max_catalogs,
        scratch=scratch,
    )
    progress = _Progress(sys.stderr.isatty() and not as_json)
    log = EventLog(events, echo=progress)
    runner = SyncLoop(
        publisher,
        wishlist,
        interval=interval,
        options=options,
        log=log,
        on_round=lambda report: _summary(report, as_json),
    )
    try:
        with progress:
            _run(runner, loop, rounds, webhook_port, webhook_host, webhook_token)
    finally:
        log.close()


def _check_scratch(scratch: Path) -> None:
    """``--scratch`` is a folder (made if missing) this user can write."""
    from cvmfs_ml.errors import ConfigError

    if scratch.exists() and not scratch.is_dir():
        raise ConfigError(f"--scratch {scratch} is not a folder; give a writable folder")
    try:
        scratch.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--scratch {scratch}: cannot make it ({exc.strerror or exc}); give a writable folder"
        ) from exc
    if not os.access(scratch, os.W_OK | os.X_OK):
        raise ConfigError(f"--scratch {scratch}: cannot write there; give a writable folder")


def _first_sigterm(runner: Any) -> Any:
    """SIGTERM lets the round finish; a second one unwinds at once, as for any command."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, _second_sigterm)
        typer.echo("cvmfs-ml: sync: stopping after this round (SIGTERM again: now)", err=True)
        runner.stop()

    return stop


def _second_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a third ends the process on the spot
    typer.echo("cvmfs-ml: sync: stopping now (SIGTERM): cleaning up the round", err=True)
    raise SystemExit(128 + signal.SIGTERM)


def _run(
    runner: Any,
    loop: bool,
    rounds: int | None,
    webhook_port: int | None,
    webhook_host: str,
    webhook_token: str | None,
) -> None:
    from cvmfs_ml.sync.webhook import WebhookServer

    server = None
    try:
        if not loop:
            runner.run_once()
            if runner.last_failure is not None:
                typer.echo(f"cvmfs-ml: sync: {runner.last_failure} failed (errors above); "
                           "fix and run again", err=True)  # fmt: skip
                raise typer.Exit(1)
            return
        if webhook_port is not None:
            server = WebhookServer(
                runner.notify, host=webhook_host, port=webhook_port, token=webhook_token
            ).start()
            typer.echo(f"sync: webhook listening at {server.url}", err=True)
        signal.signal(signal.SIGTERM, _first_sigterm(runner))
        try:
            runner.run(rounds=rounds)
        except KeyboardInterrupt:
            runner.stop()
        if rounds is not None and runner.last_failure is not None:  # scripts and CI: as one-shot
            typer.echo(
                f"cvmfs-ml: sync: the last of {runner.rounds_run} round(s) failed "
                f"({runner.last_failure}; {runner.rounds_failed} round(s) failed in all, errors "
                "above); fix and run again",
                err=True,
            )
            raise typer.Exit(1)
    finally:
        if server is not None:
            server.stop()
