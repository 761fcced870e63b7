"""``cvmfs-ml model get|path`` and ``cvmfs-ml kserve-init``: repository content as local folders.

``model get REF DEST`` and ``model path REF`` are the ``snapshot_download`` / ``oras pull`` of a
repository (links into a mount where one exists, else a verified copy); ``kserve-init`` is the
entry point of KServe's storage-initializer container for ``cvmfs://`` URIs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from cvmfs_ml.cli.common import KeyOption, _fail, friendly, one_line, visible, warn

RepoOption = Annotated[
    str | None,
    typer.Option("--repo", help="URL, repository folder, FQRN or mount, for NS/NAME:VERSION refs"),
]
ConfigOption = Annotated[
    list[Path] | None, typer.Option("--config", help="client configuration file (KEY=value)")
]
CacheOption = Annotated[
    Path | None, typer.Option("--cache", help="object cache folder (default: the configuration's)")
]
CopyOption = Annotated[
    bool, typer.Option("--copy", help="copy through the client even where a mount exists")
]


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int], None] | None]:
    """A rich byte counter on a terminal; nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import DownloadColumn, Progress, SpinnerColumn, TransferSpeedColumn

    with Progress(SpinnerColumn(), "{task.description}", DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as bar:  # fmt: skip
        task = bar.add_task(label, total=None)
        yield lambda n: bar.advance(task, n)


RefArgument = Annotated[str, typer.Argument(help="cvmfs://FQRN/NS/NAME:VERSION or NS/NAME:VERSION")]


def _locate(ref: str, dest: Path | None, repo: str | None, key: str | None,
            config: list[Path] | None, cache: Path | None, copy: bool) -> Any:  # fmt: skip
    from cvmfs_ml.models.refs import locate

    notes: list[str] = []  # printed once it worked: a failure stays one line
    with _progress(f"fetching {ref}") as progress:
        found = locate(ref, repo=repo, key=key, config_files=config or [], cache=cache,
                       use_mount=not copy, dest=dest, progress=progress,
                       warn=notes.append)  # fmt: skip
    for note in notes:
        warn(note)
    return found


def model_get(
    ref: RefArgument,
    dest: Annotated[str, typer.Argument(help="new or empty folder to fill")],
    repo: RepoOption = None,
    key: KeyOption = None,
    config: ConfigOption = None,
    cache: CacheOption = None,
    copy: CopyOption = False,
) -> None:
    """A model version into DEST: links from a mount, else fetched and verified."""
    from cvmfs_ml.models.refs import local_dest

    found = _locate(ref, local_dest(dest), repo, key, config, cache, copy)
    how = "linked from the mount" if found.mounted else "copied and verified"
    version = f", version {found.version}" if found.version else ""
    typer.echo(visible(f"{ref} -> {found.path} ({how}{version})"))  # names from the repository


def model_path(
    ref: RefArgument,
    repo: RepoOption = None,
    key: KeyOption = None,
    config: ConfigOption = None,
    cache: CacheOption = None,
    copy: CopyOption = False,
) -> None:
    """Print a local path to the version (in a mount, or the materialised cache copy)."""
    typer.echo(str(_locate(ref, None, repo, key, config, cache, copy).path))


def kserve_init(
    args: Annotated[list[str], typer.Argument(help="URI DEST [URI DEST ...] (cvmfs:// URIs)")],
    config: ConfigOption = None,
    copy: CopyOption = False,
) -> None:
    """KServe storage-initializer entry point for cvmfs:// URIs."""
    from cvmfs_ml.integrations.kserve import initialise, pair_arguments

    notes: list[str] = []  # printed once it worked: a failure stays one line
    with _progress("initialising") as progress:
        done = initialise(pair_arguments(args), config_files=config or [], use_mount=not copy,
                          progress=progress, warn=notes.append)  # fmt: skip
    for note in notes:
        warn(note)
    for item in done:
        typer.echo(one_line(f"{item.uri} -> {item.dest} ({item.how} from {item.source})"), err=True)


def _one_line(func: Callable[..., None]) -> Callable[..., None]:
    """``friendly``, plus any other OS error (permissions, a full disk) as one line."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            friendly(func)(*args, **kwargs)
        except OSError as exc:
            raise _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from exc

    return wrapper


def register_ref_commands(app: typer.Typer, model_app: typer.Typer) -> None:
    """``model get``, ``model path`` and the top-level ``kserve-init``."""
    model_app.command("get")(_one_line(model_get))
    model_app.command("path")(_one_line(model_path))
    app.command("kserve-init")(_one_line(kserve_init))
