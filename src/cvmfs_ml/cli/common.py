"""What every command module shares: error handling, repository opening, common options."""

from __future__ import annotations

import stat
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cvmfs_ml.errors import CvmfsMlError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"cvmfs-ml: {message}", err=True)
    return typer.Exit(code)


def friendly(func: F) -> F:
    """Turn our errors (and missing files) into one line on stderr and exit code 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (CvmfsMlError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        except BrokenPipeError:
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


# -- helpers -------------------------------------------------------------------------------------
def _default_key(location: str) -> Path | None:
    """For a local repository, the master public key stored by ``repo create``."""
    if location.startswith(("http://", "https://")):
        return None
    from cvmfs_ml.client.config import folder_fqrn
    from cvmfs_ml.publish.repository import default_keys_dir

    folder = Path(location)
    if not (folder / ".cvmfspublished").is_file():
        return None
    # The folder's name is the repository's: never the name the unverified manifest claims.
    candidate = default_keys_dir(folder) / f"{folder_fqrn(folder)}.pub"
    return candidate if candidate.exists() else None


def open_repository(location: str, key: str | None, tag: str | None = None, **options: Any) -> Any:
    from cvmfs_ml.client.repository import Repository

    public_key = key or _default_key(location)
    if public_key is None:
        raise _fail(f"no public key for {location}: pass --key <fqrn>.pub")
    return Repository.open(location, public_key=public_key, tag=tag, **options)


KeyOption = Annotated[
    str | None, typer.Option("--key", help="master public key: a .pub file or a folder of them")
]
TagOption = Annotated[str | None, typer.Option("--tag", help="read this tag instead of HEAD")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
BlacklistOption = Annotated[
    Path | None,
    typer.Option(
        "--blacklist",
        help="certificate blacklist in upstream's format (default: CVMFS_BLACKLIST, "
        "else /etc/cvmfs/blacklist)",
    ),
]


def use_blacklist(path: Path | None) -> None:
    """Make ``--blacklist`` this process's (and its daemons') blacklist, checked up front."""
    if path is None:
        return
    import os

    from cvmfs_ml.client.config import load_blacklist

    load_blacklist(path)  # a missing or unreadable file fails here, in one line
    os.environ["CVMFS_BLACKLIST"] = str(path.resolve())


def _entry_json(entry: Any) -> dict[str, Any]:
    kind = "dir" if entry.is_dir else "symlink" if entry.is_symlink else "file"
    if not (entry.is_dir or entry.is_symlink or entry.is_regular):
        kind = "special"
    return {
        "path": entry.path or "/",
        "type": kind,
        "size": entry.size,
        "mode": f"{stat.S_IMODE(entry.mode):04o}",
        "target": entry.symlink if entry.is_symlink else None,
        "mtime": entry.mtime,
        "chunked": entry.is_chunked,
        "compressed": entry.is_compressed if entry.is_regular else None,
        "hash": entry.digest.hex if entry.digest else None,
        "nested_catalog": bool(entry.is_nested_mountpoint or entry.is_nested_root),
    }
