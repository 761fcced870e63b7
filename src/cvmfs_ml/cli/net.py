"""``cvmfs-ml replica ...``: Stratum 1 replicas of a repository served elsewhere."""

from __future__ import annotations

import json
import sqlite3
from typing import Annotated

import typer

from cvmfs_ml.cli.common import (
    JsonOption,
    KeyOption,
    _default_key,
    _fail,
    friendly,
    one_line,
    refuse_url,
    warn,
)
from cvmfs_ml.cli.s3 import S3ConfigOption, s3_params
from cvmfs_ml.errors import is_disk_full

replica_app = typer.Typer(
    no_args_is_help=True, help="Stratum 1 replicas: verified copies of a served repository."
)


@replica_app.command("sync")
@friendly
def replica_sync(
    upstream: Annotated[
        str, typer.Argument(help="http://host/cvmfs/<fqrn> (';' list, @fqrn@) or a folder")
    ],
    dest: Annotated[
        str,
        typer.Argument(
            help="replica folder, served as /cvmfs/<fqrn>, or s3://BUCKET\\[/PREFIX]/FQRN"
        ),
    ],
    key: KeyOption = None,
    fqrn: Annotated[
        str | None, typer.Option("--fqrn", help="repository name (default: from UPSTREAM)")
    ] = None,
    proxy: Annotated[
        str | None, typer.Option("--proxy", help="CVMFS_HTTP_PROXY syntax (default DIRECT)")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=256, help="parallel downloads")
    ] = 8,
    full_history: Annotated[
        bool, typer.Option("--full-history", help="first run: also copy earlier revisions")
    ] = False,
    as_json: JsonOption = False,
    s3_config: S3ConfigOption = None,
) -> None:
    """Copy new objects and the manifest from UPSTREAM into DEST, verified, manifest last."""
    from cvmfs_ml.replica.sync import SyncReport, sync_replica

    refuse_url(dest, "a replica is written to a local folder (or s3://BUCKET[/PREFIX]/FQRN)")
    public_key = key or _default_key(upstream)
    if public_key is None:
        raise _fail(f"no public key for {upstream}: pass --key <fqrn>.pub")
    from cvmfs_ml.cli.progress import polled_progress

    live: list[SyncReport] = []

    def poll() -> tuple[int, int] | None:
        return (live[0].bytes_copied, live[0].objects_copied) if live else None

    try:
        with polled_progress("replica sync", None, poll, unit="objects"):
            report = sync_replica(
                upstream,
                dest,
                public_key,
                fqrn,
                proxy=proxy,
                workers=workers,
                full_history=full_history,
                s3_config=s3_params(s3_config),
                on_report=live.append,
            )
    except (OSError, sqlite3.Error) as exc:
        if not is_disk_full(exc):
            raise
        # A Stratum 1 has no garbage of its own to collect (not 'repo gc', the generic hint):
        # the objects copied so far are valid, and the next sync reuses them.
        copied = live[0].bytes_copied / 1e6 if live else 0.0
        raise _fail(
            f"the replica's disk is full ({dest}): its served revision is unchanged and the "
            f"{copied:.1f} MB copied so far stay for the next sync; free space on it and run "
            "replica sync again"
        ) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    was = "new replica" if report.previous_revision is None else f"was {report.previous_revision}"
    state = "up to date" if report.up_to_date else f"revision {report.revision} ({was})"
    typer.echo(
        f"{report.fqrn}: {state}: {report.catalogs_copied} catalogs and "
        f"{report.objects_copied} objects copied ({report.bytes_copied / 1e6:.1f} MB), "
        f"{report.objects_present} objects already present, in {report.seconds:.1f} s"
    )
    if report.reflog_rebuilt:
        warn(f"the replica's {dest.rstrip('/')}/.cvmfsreflog did not open: rebuilt from the "
             "catalog and history chains it holds")  # fmt: skip
    for skipped in report.skipped:
        typer.echo(one_line(f"skipped (garbage-collected upstream): {skipped}"), err=True)
