"""What every command module shares: error handling, repository opening, common options."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from cvmfs_ml.client.entries import device_number
from cvmfs_ml.errors import ECHO_LIMIT, CvmfsMlError, bounded, is_disk_full
from cvmfs_ml.models.sources.limits import UNPACK_FLOOR, UNPACK_RATIO
from cvmfs_ml.publish.archive import STREAM_ERRORS

F = TypeVar("F", bound=Callable[..., Any])


MAX_BYTES_HELP = (
    "refuse an image or model version whose manifest declares more bytes of layers than this"
    " (compressed, checked before any download)"
)
MAX_UNPACKED_HELP = (
    "refuse an image or model version whose layers unpack to more bytes than this (default:"
    f" {UNPACK_RATIO} times the bytes its manifest declares, at least {UNPACK_FLOOR >> 30} GiB,"
    " so a small gzip layer of zeros cannot fill the disk)"
)


# Characters that act on a terminal instead of showing: C0 and C1 controls (ESC starts escape
# sequences; a newline makes one name look like two), bidi overrides (they reorder what
# follows), a name's non-UTF-8 bytes in the C1 range (surrogateescape's \udc80-\udc9f: CSI on
# an 8-bit terminal), and surrogates no byte decodes to. Other non-UTF-8 bytes are written as
# they are, as `ls` does: scripts read names back as the same bytes.
_HIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udc9f\udd00-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDC9F:  # a C1 byte that was not UTF-8 (surrogateescape)
        code -= 0xDC00
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object) -> str:
    """``text`` for a terminal, with what would act on it instead of showing written as escapes
    (``\\x1b``, ``\\n``...). Names, tags and model fields come from repositories anyone can
    publish: printed raw, an escape sequence in a file name drives the reader's terminal."""
    return _HIDDEN.sub(_escape, str(text))


# A run of more characters without a space than a word errors.bounded already cut (its first
# ECHO_LIMIT and "...") is one piece of input echoed whole (a URI, a path); a line this long is
# many of them. Both are cut (errors.bounded), with their lengths.
_LONG_WORD = re.compile(rf"\S{{{ECHO_LIMIT + 4},}}")
_LINE_LIMIT = 8 * ECHO_LIMIT


def one_line(message: str) -> str:
    """``message`` as the one line printed on stderr: each long word (an echoed URI, path or
    name) cut to its first characters and its length, the line bounded as well, and whatever
    would act on a terminal (a newline included) written as an escape (:func:`visible`)."""
    text = _LONG_WORD.sub(lambda match: bounded(match.group()), message)
    return visible(bounded(text, _LINE_LIMIT))


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"cvmfs-ml: {one_line(message)}", err=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """One ``cvmfs-ml: warning: ...`` line on stderr (bounded like an error's)."""
    typer.echo(f"cvmfs-ml: warning: {one_line(message)}", err=True)


# click's UsageError, whichever click typer uses (its own copy since typer 0.2x): BadParameter's
# base class in every version, so no private module is imported for it.
_USAGE_ERROR: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError"
)


class OneLineUsageErrors(TyperGroup):
    """The top-level group: a command line the parser refuses (unknown option or command, a
    value of the wrong type, a missing argument) is one bounded ``cvmfs-ml: ...`` line on
    stderr and exit status 2, instead of typer's usage line, hint and framed box, which echoed
    the offending word in full. A group called without a command still prints its help.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> Any:  # the top level's own options
        with _usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:  # the subcommands' parsing and BadParameter from a body
        with _usage_errors_on_one_line():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_on_one_line() -> Iterator[None]:
    try:
        yield
    except _USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # its message is the help: typer prints it
            raise
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message().rstrip(".")  # type: ignore[attr-defined]
        if ctx is not None:
            message += f"; see '{ctx.command_path} --help'"
        typer.echo(f"cvmfs-ml: {one_line(message)}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None


_DISK_FULL = (
    "no space left on the device; free space on it (for a repository: 'cvmfs-ml repo gc') "
    "and try again"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_error(exc: BaseException) -> str | None:
    """The one line a user sees for ``exc``, or None for an error that is a bug (a traceback)."""
    if isinstance(exc, CvmfsMlError):
        return _first_line(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        if is_disk_full(exc):
            return f"{where}{_DISK_FULL}"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}{exc.strerror}; check the owner and permissions (or run as its owner)"
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return f"{where}{exc.strerror}; raise the open-file limit (ulimit -n) and try again"
        if exc.errno == errno.EADDRINUSE:
            return f"{exc.strerror}: choose another --port or stop the program using it"
        if exc.strerror:
            return f"{where}{exc.strerror}"
        return _first_line(exc)
    if isinstance(exc, sqlite3.Error):
        if is_disk_full(exc):
            return f"a database write failed: {_DISK_FULL}"
        return f"database error: {_first_line(exc)}"
    if isinstance(exc, UnicodeDecodeError):
        return f"input that is not valid {exc.encoding} text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, UnicodeError):
        return (
            f"text that cannot be written in this encoding ({_first_line(exc)}); "
            "use a UTF-8 locale (e.g. LC_ALL=C.UTF-8)"
        )
    if isinstance(exc, STREAM_ERRORS):  # what a broken archive raises, unnamed below
        return f"corrupt or truncated archive: {_first_line(exc)}"
    return None


def friendly(func: F) -> F:
    """Turn errors with a known cause into one line on stderr and exit code 1.

    The one place errors are mapped (docs/style.md): our own errors say what to do; operating
    system, database, text-encoding and archive errors get their cause named here. Anything
    else is a bug and keeps its traceback.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _refuse_urls_as_paths(func, kwargs)
            return func(*args, **kwargs)
        except BrokenPipeError:
            raise typer.Exit(0) from None
        except (CvmfsMlError, OSError, sqlite3.Error, UnicodeError, *STREAM_ERRORS) as exc:
            raise _fail(describe_error(exc) or _first_line(exc)) from exc

    return wrapper  # type: ignore[return-value]


# A URL given to a parameter typed as a local path arrives with its "//" collapsed by Path.
_URL_AS_PATH = re.compile(r"(?:https?|s3|cvmfs|oci|mlflow|docker|gs|ftp):/(?!/)")


def _refuse_urls_as_paths(func: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Fail in one line where a local path parameter was given a URL: ``Path("http://h/x")`` is
    ``http:/h/x``, which the command would otherwise make as a folder named ``http:``."""
    for name, value in kwargs.items():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, Path) and _URL_AS_PATH.match(str(item)):
                url = str(item).replace(":/", "://", 1)
                raise _fail(f"{url} is a URL; {_parameter_label(func, name)} names a local "
                            "file or folder")  # fmt: skip


def _parameter_label(func: Callable[..., Any], name: str) -> str:
    """How the user wrote parameter ``name`` of command ``func``: its option or argument."""
    import typing

    from typer.models import OptionInfo

    try:
        hint = typing.get_type_hints(func, include_extras=True).get(name)
    except (NameError, TypeError):
        hint = None
    for meta in getattr(hint, "__metadata__", ()):
        if isinstance(meta, OptionInfo):
            decls = [d for d in meta.param_decls or () if d.startswith("--")]
            return max(decls, key=len) if decls else "--" + name.replace("_", "-")
    return name.upper()


# -- helpers -------------------------------------------------------------------------------------
def _default_key(location: str) -> Path | None:
    """For a local repository, the master public key stored by ``repo create``."""
    if location.startswith(("http://", "https://")):
        return None
    from cvmfs_ml.client.locate import local_default_key

    return local_default_key(Path(location))


def open_repository(
    location: str,
    key: str | os.PathLike[str] | None,
    tag: str | None = None,
    *,
    config: Sequence[str | os.PathLike[str]] | None = None,
    proxy: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Any:
    """Open what a reader command names: an ``http(s)://.../cvmfs/<fqrn>`` URL, a repository
    folder, or a FQRN found through the configuration (``--config``, ``CVMFS_ML_CONFIG``).

    Proxies come from ``--proxy`` or the configuration's ``CVMFS_HTTP_PROXY`` (the environment
    included), so browsing goes through the site's Squid like a mount does. Without ``cache``
    the objects go to a private temporary cache.
    """
    from cvmfs_ml.client.locate import open_target

    if tag is not None:
        options["tag"] = tag
    s3_config = options.pop("s3_config", None)
    if location.startswith("s3://"):  # a Stratum 0 in a bucket, read through its store
        from cvmfs_ml.client.repository import Repository

        public_key = key or _default_key(location)
        if public_key is None:
            raise _fail(f"no public key for {location}: pass --key <fqrn>.pub")
        return Repository.open(location, public_key=public_key, s3_config=s3_config, **options)
    return open_target(
        location,
        public_key=os.fspath(key) if key is not None else None,
        cache=cache,
        proxy=proxy,
        config_files=[os.fspath(p) for p in config or ()],
        use_config_cache=False,
        **options,
    )


def open_publisher(repo: str, keys: Path | None, s3_config: Path | None = None) -> Any:
    """Open what a writing command names: the repository folder (or S3 bucket) with its keys.

    A URL cannot be written; said so, not taken for a folder named ``http:``."""
    from cvmfs_ml.cli.s3 import s3_params
    from cvmfs_ml.publish.repository import Publisher

    refuse_url(repo)
    return Publisher.open(repo, keys, s3_config=s3_params(s3_config))


def refuse_url(
    location: str,
    needs: str = "writing needs the repository folder (or s3://) and its keys: run this where "
    "the repository is published",
) -> None:
    """Fail in one line when a command that writes a repository is given its URL, which would
    otherwise be taken for a local folder named ``http:``."""
    if location.startswith(("http://", "https://")):
        raise _fail(f"{location} is a URL; {needs}")


# Help texts are Rich markup: a backslash keeps a "[" literal (else "[/PREFIX]" is a closing tag).
REPO_HELP = "repository folder or s3://BUCKET\\[/PREFIX]/FQRN"
LOCATION_HELP = "repository: http(s)://.../cvmfs/<fqrn>, a repository folder, or a FQRN (--config)"

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


# What the JSON encoder leaves raw but a terminal acts on: DEL, C1 controls (0x9b is CSI on an
# 8-bit terminal) and bidi overrides. Escaped as \\uXXXX, which decodes to the same text.
_JSON_HIDDEN = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def json_text(value: Any, **options: Any) -> str:
    """JSON for stdout: UTF-8 as is, except characters that act on a terminal (escaped);
    names that are not UTF-8 (surrogates) as ``\\udcXX`` escapes, which ``json.loads`` +
    ``os.fsencode`` turn back into the same bytes."""
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **options)
    return _JSON_HIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


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
        **({"size": 0, "rdev": rdev} if (rdev := device_number(entry)) else {}),
    }
