"""``cvmfs-ml sync WISHLIST --repo REPO [--loop] [--interval S]``: registries -> repository."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from cvmfs_ml.cli.common import friendly


def _echo_event(event: Any) -> None:
    if event.status == "error":
        typer.echo(f"error: {event.action} {event.image}: {event.error}", err=True)


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
    repo: Annotated[Path, typer.Option("--repo", help="local repository folder")],
    loop: Annotated[bool, typer.Option("--loop", help="keep syncing every --interval")] = False,
    interval: Annotated[float, typer.Option("--interval", help="seconds between rounds")] = 300.0,
    keys: Annotated[Path | None, typer.Option("--keys", help="keys folder")] = None,
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
    webhook_port: Annotated[
        int | None, typer.Option("--webhook-port", help="with --loop: listen for notifications")
    ] = None,
    webhook_host: Annotated[str, typer.Option("--webhook-host")] = "127.0.0.1",
    webhook_token: Annotated[
        str | None, typer.Option("--webhook-token", envvar="CVMFS_ML_WEBHOOK_TOKEN")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="with --loop: stop after N rounds")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON report per round")] = False,
) -> None:
    """Sync images (unpacked, DUCC layout) and model artifacts (versions) into REPO."""
    from cvmfs_ml.errors import ConfigError
    from cvmfs_ml.publish.repository import Publisher
    from cvmfs_ml.sync.auth import AuthFile
    from cvmfs_ml.sync.engine import SyncOptions
    from cvmfs_ml.sync.events import EventLog
    from cvmfs_ml.sync.loop import SyncLoop
    from cvmfs_ml.sync.webhook import WebhookServer
    from cvmfs_ml.sync.wishlist import load_wishlist

    if interval <= 0:
        raise ConfigError("--interval must be positive")
    if webhook_port is not None and not loop:
        raise ConfigError("--webhook-port needs --loop")
    load_wishlist(wishlist)  # a broken wishlist fails before anything starts
    publisher = Publisher(repo, keys)
    options = SyncOptions(
        plain_http=plain_http,
        grace_seconds=grace_period,
        gc=not no_gc,
        platform=platform,
        auth=AuthFile.load(auth_file),
    )
    log = EventLog(events, echo=_echo_event)
    runner = SyncLoop(
        publisher,
        wishlist,
        interval=interval,
        options=options,
        log=log,
        on_round=lambda report: _summary(report, as_json),
    )
    server = None
    try:
        if not loop:
            report = runner.run_once()
            if report is None or report.errors:
                failed = report.errors if report is not None else "the round"
                typer.echo(f"cvmfs-ml: sync: {failed} failed (errors above); fix and run again",
                           err=True)  # fmt: skip
                raise typer.Exit(1)
            return
        if webhook_port is not None:
            server = WebhookServer(
                runner.notify, host=webhook_host, port=webhook_port, token=webhook_token
            ).start()
            typer.echo(f"sync: webhook listening at {server.url}", err=True)
        signal.signal(signal.SIGTERM, lambda *_: runner.stop())
        try:
            runner.run(rounds=rounds)
        except KeyboardInterrupt:
            runner.stop()
    finally:
        if server is not None:
            server.stop()
        log.close()
