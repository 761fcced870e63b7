"""The ``cvmfs-ml`` command line (docs/cli.md is the contract).

Every command exits 0 on success and non-zero with a one-line reason on stderr otherwise;
commands that print data take ``--json``. One module per command group; this one assembles them.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from cvmfs_ml.cli.bench import bench_app
from cvmfs_ml.cli.client import register_client_commands
from cvmfs_ml.cli.common import OneLineUsageErrors, _fail, friendly, warn
from cvmfs_ml.cli.ingest import model_ingest
from cvmfs_ml.cli.model import model_app
from cvmfs_ml.cli.net import replica_app
from cvmfs_ml.cli.refs import register_ref_commands
from cvmfs_ml.cli.registry import register_registry_commands
from cvmfs_ml.cli.repo import repo_app
from cvmfs_ml.cli.sync import sync_command

app = typer.Typer(
    cls=OneLineUsageErrors,
    no_args_is_help=True,
    add_completion=False,
    help="CernVM-FS for ML models.",
)
app.add_typer(repo_app, name="repo")
model_app.command("ingest")(model_ingest)
app.add_typer(model_app, name="model")
register_client_commands(app)
app.add_typer(replica_app, name="replica")
app.add_typer(bench_app, name="bench")
register_ref_commands(app, model_app)
register_registry_commands(app)
app.command("sync")(sync_command)


# -- serve ---------------------------------------------------------------------------------------
@app.command("serve")
@friendly
def serve(
    root: Annotated[Path, typer.Argument(help="folder holding <fqrn>/ repository folders")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8080,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
) -> None:
    """Serve ROOT/<fqrn>/ at http://HOST:PORT/cvmfs/<fqrn> (cache headers as a Stratum 1)."""
    from cvmfs_ml.storage.http import RepositoryServer, private_keys_under

    if (root / ".cvmfspublished").is_file():  # every /cvmfs/<fqrn>/ under it would be a 404
        raise _fail(f"{root} is a repository folder, not ROOT: serve its parent ({root.parent}),"
                    f" which serves it as /cvmfs/{root.name}")  # fmt: skip
    keys = private_keys_under(root) if root.is_dir() else []
    if keys:
        warn(
            f"{len(keys)} private key file(s) under {root} (e.g. {keys[0]}); "
            "they are never served, but keep keys out of a web root"
        )
    server = RepositoryServer(root, host=host, port=port)
    typer.echo(f"serving {root} at {server.url}/cvmfs/<fqrn>", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command("demo")
@friendly
def demo(
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="working folder: new or empty, or one an earlier demo made (emptied first); "
            "default: a new folder under the system's temporary folder",
        ),
    ] = None,
    llm_mib: Annotated[
        int, typer.Option(min=1, help="size of the LLM-shaped model's weights, MiB")
    ] = 64,
) -> None:
    """Create, publish a generated model, serve, read back cold, run onnxruntime, compare."""
    from rich.console import Console
    from rich.table import Table

    from cvmfs_ml.bench.demo import run_demo
    from cvmfs_ml.models.refs import local_dest

    console = Console()
    folder = local_dest(out, "--out") if out else Path(tempfile.mkdtemp(prefix="cvmfs-ml-demo-"))
    console.print(f"[dim]working in {folder.absolute()}")
    result = run_demo(folder, llm_bytes=llm_mib * 2**20, log=lambda m: console.print(f"[dim]{m}"))
    table = Table(title=f"cvmfs-ml demo: {result.url}")
    for column in ("model", "read through", "cache", "open s", "1st inference s", "same output"):
        table.add_column(column)
    for row in result.rows:
        table.add_row(
            row.model,
            row.mode,
            row.cache,
            f"{row.open_s:.3f}",
            f"{row.first_inference_s:.4f}",
            "yes" if row.identical_output else "NO",
        )
    console.print(table)
    console.print(
        f"published {result.published_bytes / 2**20:.1f} MiB in {result.publish_s:.2f} s;"
        f" results in {folder / 'demo.json'}"
    )
    for reason in result.skipped:
        console.print(f"[yellow]skipped: {reason}")
    if not all(row.identical_output for row in result.rows):
        raise typer.Exit(1)


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C instead of ending the process on the spot.

    Python's default ends the process without running ``finally`` blocks, so a batch system's
    walltime kill or a ``timeout`` left what a command had started: the demo's and the
    benchmarks' mounts (their daemons still running, their servers gone), nginx, squid and
    registry processes, and half-written work folders. Raising ``SystemExit`` here runs every
    context manager on the way out. A second SIGTERM ends the process at once, as the first one
    used to.
    """

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("cvmfs-ml: stopping (SIGTERM): cleaning up what was started", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _stop_on_sigterm()
    # Repository names are bytes (issue 9): print an undecodable one as the bytes it is, like ls.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    app(prog_name="cvmfs-ml")  # also under ``python -m cvmfs_ml``: usage lines name the command


__all__ = ["app", "main"]
