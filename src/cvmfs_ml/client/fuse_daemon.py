"""The FUSE daemon: a process that opens a repository and serves it at a mount point.

:func:`cvmfs_ml.client.mounts.mount` starts ``python -m cvmfs_ml.client.fuse_daemon TARGET
MOUNTPOINT ...`` and waits for its "ready" line on a pipe; ``cvmfs-ml mount --foreground`` calls
:func:`run_foreground` in its own process. The file system operations themselves are
:class:`cvmfs_ml.client.fuse.CvmfsOperations`; this module runs them under pyfuse3 and trio
with signal handling, trace flushing and live updates.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import resource
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cvmfs_ml.client.config import NFILES, load_config
from cvmfs_ml.client.fuse import CvmfsOperations, require_pyfuse3
from cvmfs_ml.client.mounts import check_mountpoint, is_mounted, set_readahead
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import ConfigError

__all__ = ["raise_open_file_limit", "run_foreground", "serve"]

log = logging.getLogger("cvmfs_ml.fuse")


@dataclass
class _State:
    terminated: bool = False
    early_signal: int = 0  # a stop signal that came before the loop could take it
    extra: dict[str, Any] = field(default_factory=dict)

    def note_signal(self, signum: int, _frame: Any) -> None:
        self.early_signal = signum


def serve(
    repository: Repository,
    mountpoint: str | os.PathLike[str],
    *,
    allow_other: bool | None = None,
    readahead_kb: int = 1024,
    workers: int = 16,
    debug: bool = False,
    ready: Callable[[], None] | None = None,
    flush_trace_every: float = 1.0,
    nonempty: bool = False,
    tag: str | None = None,
) -> None:
    """Mount ``repository`` at ``mountpoint`` and serve requests until unmounted.

    Returns after ``fusermount3 -u`` (or SIGINT/SIGTERM/SIGHUP, which unmount first).
    ``ready`` is called once the mount answers requests. ``allow_other`` (default: when
    running as root) lets other users read the mount, as upstream's mounts do. A folder that
    is a mount point already, or (unless ``nonempty``) holds files, is refused. New revisions
    are followed on the TTL unless the repository is pinned (:mod:`.fuse_live`).
    """
    import trio

    pyfuse3 = require_pyfuse3()
    target = check_mountpoint(mountpoint, nonempty=nonempty)
    operations = CvmfsOperations(repository, workers=workers, tag=tag)
    options = {"ro", "default_permissions", f"fsname=cvmfs-ml:{repository.fqrn}",
               "subtype=cvmfs-ml"}  # fmt: skip
    if allow_other if allow_other is not None else os.geteuid() == 0:
        options.add("allow_other")
    if debug:
        options.add("debug")
    state = _State()
    # From the mount to the loop's signal receiver, a stop signal's default action would end
    # the process with the mount left behind, dead ("transport endpoint is not connected"):
    # a job's SIGTERM just as the mount came up did. It is noted here and acted on at once.
    previous = {signum: signal.signal(signum, state.note_signal) for signum in _STOP_SIGNALS}
    pyfuse3.init(operations, target, options)
    try:
        trio.run(_serve_async, operations, target, state, readahead_kb, ready, flush_trace_every)
    finally:
        try:
            # After an outside `fusermount3 -u` the mount is gone: unmounting again could hit
            # a new mount at the same place. Unmount only if we stopped on our own.
            pyfuse3.close(unmount=state.terminated or is_mounted(target))
            tracer = repository.tracer
            if tracer is not None:
                tracer.flush()
        finally:  # once unmounted (`mount --foreground`: the CLI's handlers again)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _serve_async(
    operations: CvmfsOperations,
    mountpoint: str,
    state: _State,
    readahead_kb: int,
    ready: Callable[[], None] | None,
    flush_every: float,
) -> None:
    import trio

    pyfuse3 = require_pyfuse3()

    async def on_signals() -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            if state.early_signal:
                log.info("signal %d before serving: unmounting %s", state.early_signal, mountpoint)
                state.terminated = True
                pyfuse3.terminate()
                return
            async for signum in signals:
                log.info("signal %d: unmounting %s", signum, mountpoint)
                state.terminated = True
                pyfuse3.terminate()
                return

    async def flush_trace() -> None:
        tracer = operations.repo.tracer
        while tracer is not None:
            await trio.sleep(flush_every)
            tracer.flush()

    async def announce() -> None:
        # A stat of the mount point goes through the kernel to this loop: once it returns,
        # the mount serves requests. Abandoned when a signal stops the loop first: nothing
        # will answer it then, and waiting for its thread kept the daemon from unmounting.
        named = inspect.signature(trio.to_thread.run_sync).parameters  # trio renamed it
        abandon = "abandon_on_cancel" if "abandon_on_cancel" in named else "cancellable"
        await trio.to_thread.run_sync(os.stat, mountpoint, **{abandon: True})
        state.extra["readahead_kb"] = await trio.to_thread.run_sync(
            set_readahead, mountpoint, readahead_kb
        )
        log.info("mounted %s at %s (read_ahead_kb=%s)", operations.repo.fqrn, mountpoint,
                 state.extra["readahead_kb"])  # fmt: skip
        if ready is not None:
            ready()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        nursery.start_soon(flush_trace)
        nursery.start_soon(announce)
        nursery.start_soon(operations.live.run)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ entry point
def run_foreground(
    target: str,
    mountpoint: str,
    *,
    public_key: str | None = None,
    cache: str | None = None,
    proxy: str | None = None,
    config_files: Sequence[str] = (),
    trace: str | None = None,
    tag: str | None = None,
    allow_other: bool | None = None,
    readahead_kb: int = 1024,
    prefetch_workers: int | None = None,
    debug: bool = False,
    ready: Callable[[], None] | None = None,
    nonempty: bool = False,
) -> None:
    """Open ``target`` and serve it at ``mountpoint`` in this process until unmounted."""
    from cvmfs_ml.client.locate import open_target
    from cvmfs_ml.client.trace import Tracer

    wanted = configured_open_files(target, config_files)
    allowed = raise_open_file_limit(wanted)
    if allowed < min(wanted, MIN_OPEN_FILES):
        log.warning("only %d open files allowed (the hard limit): a busy mount may run out; "
                    "raise it (ulimit -Hn, or LimitNOFILE= for a service)", allowed)  # fmt: skip

    check_mountpoint(mountpoint, nonempty=nonempty)  # before any download
    tracer = Tracer(trace) if trace else None
    options: dict[str, Any] = {"tracer": tracer}
    if tag is not None:
        options["tag"] = tag
    if prefetch_workers is not None:
        options["prefetch_workers"] = prefetch_workers
    repository = open_target(
        target, public_key=public_key, cache=cache, proxy=proxy, config_files=config_files,
        **options,
    )  # fmt: skip
    try:
        serve(
            repository, mountpoint, allow_other=allow_other, readahead_kb=readahead_kb,
            debug=debug, ready=ready, nonempty=nonempty, tag=tag,
            workers=max(16, 2 * (prefetch_workers or 8)),
        )  # fmt: skip
    finally:
        repository.close()
        if tracer is not None:
            tracer.close()


MIN_OPEN_FILES = 8192


def configured_open_files(target: str, config_files: Sequence[str] = ()) -> int:
    """``CVMFS_NFILES`` of ``target``'s client configuration, else :data:`NFILES`.

    A URL or folder mounts without a complete configuration; then the default applies.
    """
    from cvmfs_ml.client.locate import target_fqrn

    try:
        return load_config(target_fqrn(target), list(config_files)).nfiles
    except ConfigError:
        return NFILES


def raise_open_file_limit(wanted: int = NFILES) -> int:
    """Raise this process's soft limit on open files to ``wanted``, within the hard limit;
    return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit to %d: %s", target, exc)
    return wanted if soft == resource.RLIM_INFINITY else soft


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m cvmfs_ml.client.fuse_daemon TARGET MOUNTPOINT ...``: what ``mount()`` starts."""
    parser = argparse.ArgumentParser(prog="python -m cvmfs_ml.client.fuse_daemon")
    parser.add_argument("target")
    parser.add_argument("mountpoint")
    parser.add_argument("--key")
    parser.add_argument("--cache")
    parser.add_argument("--proxy")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--trace")
    parser.add_argument("--tag")
    parser.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--readahead-kb", type=int, default=1024)
    parser.add_argument("--parallel", type=int)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--nonempty", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s cvmfs-ml-fuse[%(process)d] %(levelname)s %(message)s",
    )
    ready_fd = args.ready_fd

    def say(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(ready_fd, (message.replace("\n", " ") + "\n").encode())
            os.close(ready_fd)
        ready_fd = None

    try:
        run_foreground(
            args.target, args.mountpoint, public_key=args.key, cache=args.cache,
            proxy=args.proxy, config_files=args.config, trace=args.trace, tag=args.tag,
            allow_other=args.allow_other, readahead_kb=args.readahead_kb,
            prefetch_workers=args.parallel, debug=args.debug, ready=lambda: say("ready"),
            nonempty=args.nonempty,
        )  # fmt: skip
    except Exception as exc:
        log.error("%s", exc, exc_info=args.debug)
        say(f"{type(exc).__name__}: {exc}")
        return 1
    say("the daemon stopped before the mount was ready")
    return 0


def _module_main() -> None:
    # A tempfile default in a detached daemon must not point into a removed cwd.
    tempfile.tempdir = tempfile.gettempdir()
    raise SystemExit(_main())


if __name__ == "__main__":
    _module_main()
