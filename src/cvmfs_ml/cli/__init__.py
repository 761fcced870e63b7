"""The ``cvmfs-ml`` command line (docs/cli.md is the contract).

Every command exits 0 on success and non-zero with a one-line reason on stderr otherwise;
commands that print data take ``--json``. One module per command group; this one assembles them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cvmfs_ml.cli.client import register_client_commands
from cvmfs_ml.cli.common import friendly
from cvmfs_ml.cli.ingest import model_ingest
from cvmfs_ml.cli.model import model_app
from cvmfs_ml.cli.repo import repo_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CernVM-FS for ML models.")
app.add_typer(repo_app, name="repo")
model_app.command("ingest")(model_ingest)
app.add_typer(model_app, name="model")
register_client_commands(app)


# -- serve ---------------------------------------------------------------------------------------
@app.command("serve")
@friendly
def serve(
    root: Annotated[Path, typer.Argument(help="folder holding <fqrn>/ repository folders")],
    port: Annotated[int, typer.Option("--port")] = 8080,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
) -> None:
    """Serve ROOT/<fqrn>/ at http://HOST:PORT/cvmfs/<fqrn> (cache headers as a Stratum 1)."""
    from cvmfs_ml.storage.http import RepositoryServer

    server = RepositoryServer(root, host=host, port=port)
    typer.echo(f"serving {root} at {server.url}/cvmfs/<fqrn>", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


__all__ = ["app", "main"]
