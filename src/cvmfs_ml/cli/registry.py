"""``cvmfs-ml registry ...`` (the publishing service and its tokens) and ``cvmfs-ml wait``."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated

import typer

from cvmfs_ml.cli.common import _fail, friendly, refuse_url

registry_app = typer.Typer(
    no_args_is_help=True, help="The registry service: publish by content ID, tokens."
)
token_app = typer.Typer(no_args_is_help=True, help="Bearer tokens (stored hashed in --config).")
registry_app.add_typer(token_app, name="token")

ConfigFileOption = Annotated[
    Path, typer.Option("--config", help="registry configuration file (JSON; created if missing)")
]


@registry_app.command("serve")
@friendly
def registry_serve(
    repo: Annotated[
        list[str], typer.Option("--repo", help="repository folder (repeat for two or more)")
    ],
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8081,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    config: Annotated[
        Path | None, typer.Option("--config", help="registry configuration file (JSON)")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="queue database and upload spool (default: beside --config)"),
    ] = None,
    poll: Annotated[float, typer.Option("--poll", help="worker idle poll, seconds")] = 1.0,
    stratum1: Annotated[
        Path | None,
        typer.Option(
            "--stratum1", help="snapshot each publish into DIR/<fqrn> (a local Stratum 1)"
        ),
    ] = None,
    log_format: Annotated[
        str, typer.Option("--log-format", help="text, or json (one object per line)")
    ] = "text",
) -> None:
    """Serve user-pub's /pubapi/, the JSON /api/v1/, OCI /v2/, a web page, /metrics, /healthz."""
    if log_format not in ("text", "json"):
        raise typer.BadParameter("--log-format is text or json")
    import uvicorn

    from cvmfs_ml.registry.app import create_app
    from cvmfs_ml.registry.config import ConfigFile
    from cvmfs_ml.registry.connections import KEEP_ALIVE_SECONDS, bounded_http
    from cvmfs_ml.registry.heap import bound_malloc_arenas
    from cvmfs_ml.registry.logs import configure_logging
    from cvmfs_ml.registry.service import RegistryService

    for location in repo:
        refuse_url(location)
    folders = [Path(location) for location in repo]
    listener = _listen(host, port)  # a port in use is one line, before anything starts
    port = listener.getsockname()[1]
    bound_malloc_arenas()  # before the service starts its threads

    data_dir = data or ((config.parent if config else folders[0].parent) / "registry-data")
    service = RegistryService(
        folders, data_dir, ConfigFile(config), poll_seconds=poll, stratum1=stratum1
    )
    for worker in service.workers.values():
        ttl = worker.publisher.settings.ttl
        if ttl > 60:  # user-pub's repositories use 15 s so jobs see new CIDs quickly
            typer.echo(f"note: {worker.fqrn} has a {ttl} s TTL; clients see new CIDs only"
                       " that late (user-pub uses CVMFS_REPOSITORY_TTL=15)", err=True)  # fmt: skip
    configure_logging(log_format)
    typer.echo(f"registry for {', '.join(service.repositories)} at http://{host}:{port}/", err=True)
    http = bounded_http(lambda: service.config, service.metrics)
    config = uvicorn.Config(
        create_app(service), host=host, port=port, log_config=None, log_level="info", http=http,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    uvicorn.Server(config).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """The service's listening socket, bound here so that an address in use (or a host that
    does not resolve) is an OSError the CLI reports in one line, not uvicorn's log and exit 3."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)


@token_app.command("add")
@friendly
def token_add(
    name: Annotated[str, typer.Argument(help="who or what the token is for")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="read:NS, publish:NS (NS or *), admin; repeat")
    ],
    config: ConfigFileOption,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from cvmfs_ml.registry.config import add_token

    typer.echo(add_token(config, name, scope))


@token_app.command("revoke")
@friendly
def token_revoke(name: Annotated[str, typer.Argument()], config: ConfigFileOption) -> None:
    """Revoke a token (a running service notices at its next request)."""
    from cvmfs_ml.registry.config import revoke_token

    revoke_token(config, name)
    typer.echo(f"revoked {name}", err=True)


@token_app.command("list")
@friendly
def token_list(
    config: ConfigFileOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Names, scopes and state of the tokens (never the tokens themselves)."""
    from cvmfs_ml.registry.config import load_config

    if not config.exists():  # a mistyped path is not a registry without tokens
        raise _fail(f"{config}: no registry configuration there ('registry token add' "
                    "creates it)")  # fmt: skip
    rows = [
        {"name": t.name, "scopes": list(t.scopes), "revoked": t.revoked, "created": t.created}
        for t in load_config(config).tokens.values()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "revoked" if row["revoked"] else "active"
        typer.echo(f"{row['name']}\t{state}\t{' '.join(row['scopes'])}")


@friendly
def wait_command(
    cid: Annotated[str, typer.Argument(help="content ID, e.g. GROUP/SHA256")],
    repo: Annotated[
        list[str], typer.Option("--repo", help="URL, repository folder or FQRN; repeatable")
    ],
    timeout: Annotated[float, typer.Option("--timeout", help="seconds")] = 1200.0,
    interval: Annotated[float, typer.Option("--interval", help="seconds between polls")] = 5.0,
    prefix: Annotated[str, typer.Option("--prefix", help="CID folder in the repository")] = "sw",
    key: Annotated[
        str | None, typer.Option("--key", help="master public key: a .pub file or a folder")
    ] = None,
    config: Annotated[
        list[Path] | None, typer.Option("--config", help="client configuration (KEY=value)")
    ] = None,
) -> None:
    """Wait until CID is visible in any --repo; print its /cvmfs path."""
    from cvmfs_ml.registry.wait import wait_for_cid

    path = wait_for_cid(
        cid, repo, timeout=timeout, interval=interval, prefix=prefix, public_key=key,
        config_files=[str(p) for p in config or []],
    )  # fmt: skip
    typer.echo(path)


def register_registry_commands(app: typer.Typer) -> None:
    app.add_typer(registry_app, name="registry")
    app.command("wait")(wait_command)
