"""Start, find and stop mount daemons: the mount table, ``mount()`` and ``unmount()``.

``mount()`` starts ``python -m cvmfs_ml.client.fuse_daemon`` as a separate process (pyfuse3
keeps one mount per process, and readers should not share the daemon's GIL) and returns once
the mount answers. Before it starts anything it refuses a folder that is already a mount point
(saying what is mounted there) or that holds files (unless ``nonempty``): mounting "just in
case" from a job prologue must never pull a working mount from under running jobs, nor hide a
folder's files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError, CvmfsMlError

__all__ = [
    "MountHandle",
    "check_mountpoint",
    "is_mounted",
    "mount",
    "mounted_source",
    "set_readahead",
    "unmount",
]

log = logging.getLogger("cvmfs_ml.fuse")


def _unescape_mountinfo(text: str) -> str:
    return (
        text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
        .replace("\\134", "\\")
    )  # fmt: skip


def _mount_entry(mountpoint: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(major:minor, source)`` of the file system mounted at ``mountpoint`` (mountinfo)."""
    target = os.path.realpath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    tail = fields[fields.index("-") + 1 :] if "-" in fields else []
                    source = _unescape_mountinfo(tail[1]) if len(tail) > 1 else "?"
                    found = (fields[2], source)  # the last (topmost) mount wins
    except OSError:
        return None
    return found


def _mount_device(mountpoint: str | os.PathLike[str]) -> str | None:
    """``major:minor`` of the file system mounted at ``mountpoint``."""
    entry = _mount_entry(mountpoint)
    return entry[0] if entry is not None else None


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at ``mountpoint`` (no request reaches the file system)."""
    return _mount_device(mountpoint) is not None


def set_readahead(mountpoint: str | os.PathLike[str], kib: int = 1024) -> int | None:
    """Raise the mount's readahead so the kernel asks for up to ``kib`` KiB per request.

    FUSE mounts start at 128 KiB; 1024 gives 1 MiB requests (libfuse's max_pages limit),
    which cuts per-request overhead for mmap loaders (performance-notes.md takeaway 4).
    Needs root; best-effort. Returns the value now in effect, or ``None`` when unknown.
    """
    device = _mount_device(mountpoint)
    if device is None:
        return None
    knob = Path("/sys/class/bdi") / device / "read_ahead_kb"
    try:
        if kib > 0 and os.geteuid() == 0:
            knob.write_text(f"{int(kib)}\n")
        return int(knob.read_text().strip())
    except (OSError, ValueError) as exc:
        log.info("cannot set %s: %s", knob, exc)
        try:
            return int(knob.read_text().strip())
        except (OSError, ValueError):
            return None


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def unmount(
    mountpoint: str | os.PathLike[str], *, lazy: bool = False, timeout: float = 10.0
) -> None:
    """Unmount a FUSE mount (``fusermount3 -u``; ``umount`` when that is missing).

    ``lazy`` detaches it even while files are open (``-z``). Raises :class:`OSError` with the
    tool's message when it fails (busy, not mounted...).
    """
    target = os.fspath(mountpoint)
    tool = _fusermount()
    if tool is not None:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + ["--", target]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [target]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise OSError(errno.EBUSY if "busy" in message.lower() else errno.EINVAL, message, target)


def mounted_source(mountpoint: str | os.PathLike[str]) -> str | None:
    """What is mounted at ``mountpoint`` (mountinfo's source, e.g. ``cvmfs-ml:<fqrn>``)."""
    entry = _mount_entry(mountpoint)
    return entry[1] if entry is not None else None


def check_mountpoint(mountpoint: str | os.PathLike[str], *, nonempty: bool = False) -> str:
    """The real path of a folder a repository may be mounted at, or a :class:`ConfigError`.

    Refused: a missing folder or a file, a folder that already is a mount point (the message
    names what is mounted there; the mount is left alone), and a folder with files in it unless
    ``nonempty`` (mounting would hide them, which upstream refuses too).
    """
    target = os.path.realpath(mountpoint)
    source = mounted_source(target)  # first: a dead daemon's mount fails every stat
    if source is not None:
        raise ConfigError(
            f"{target} is already a mount point ({source}); it stays mounted. Unmount it first "
            f"(cvmfs-ml umount {target}) or pick another folder"
        )
    if not os.path.isdir(target):
        raise ConfigError(f"mount point {mountpoint} is not a directory: create it first (mkdir)")
    if not nonempty:
        try:
            with os.scandir(target) as entries:
                has_files = next(entries, None) is not None
        except OSError as exc:
            raise ConfigError(f"cannot read mount point {target}: {exc.strerror}") from exc
        if has_files:
            raise ConfigError(
                f"{target} is not empty: mounting would hide its files. Pick an empty folder "
                "or pass --nonempty"
            )
    return target


# ------------------------------------------------------------------------------ mount()
@dataclass
class MountHandle:
    """A running mount daemon; :meth:`unmount` stops it (also on ``with`` exit)."""

    mountpoint: Path
    pid: int
    process: subprocess.Popen[bytes] | None = None
    log_file: Path | None = None

    @property
    def mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def unmount(self, timeout: float = 15.0) -> None:
        """Unmount and wait for the daemon to exit; lazy-unmount and kill it if it hangs."""
        deadline = time.monotonic() + timeout
        if self.mounted:
            try:
                unmount(self.mountpoint, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("unmount %s: %s; detaching lazily", self.mountpoint, exc)
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    unmount(self.mountpoint, lazy=True, timeout=timeout)
        if self.process is not None:
            try:
                self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        else:
            _wait_pid_gone(self.pid, deadline)

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def _wait_pid_gone(pid: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def mount(
    target: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    public_key: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    proxy: str | None = None,
    config_files: Sequence[str | os.PathLike[str]] = (),
    trace: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    allow_other: bool | None = None,
    readahead_kb: int = 1024,
    prefetch_workers: int | None = None,
    log_file: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    nonempty: bool = False,
) -> MountHandle:
    """Start a mount daemon for ``target`` (URL, repository folder or FQRN) and wait for it.

    Returns once the mount answers requests; raises :class:`CvmfsMlError` with the daemon's
    reason when it fails to start within ``timeout`` seconds. The daemon runs in its own
    session, so it outlives the caller unless unmounted (``handle.unmount()``).
    """
    text = os.fspath(target)
    if not text.startswith(("http://", "https://")) and os.path.exists(text):
        text = os.path.abspath(text)

    def absolute(p: str | os.PathLike[str] | None) -> str | None:
        return None if p is None else os.path.abspath(os.fspath(p))

    point = Path(check_mountpoint(mountpoint, nonempty=nonempty))
    argv = [sys.executable, "-m", "cvmfs_ml.client.fuse_daemon", text, str(point)]
    if nonempty:
        argv.append("--nonempty")
    for flag, value in (
        ("--key", absolute(public_key)), ("--cache", absolute(cache)), ("--proxy", proxy),
        ("--trace", absolute(trace)), ("--tag", tag),
    ):  # fmt: skip
        if value is not None:
            argv += [flag, value]
    for config in config_files:
        argv += ["--config", os.path.abspath(config)]
    if allow_other is not None:
        argv.append("--allow-other" if allow_other else "--no-allow-other")
    argv += ["--readahead-kb", str(readahead_kb)]
    if prefetch_workers is not None:
        argv += ["--parallel", str(prefetch_workers)]
    read_fd, write_fd = os.pipe()
    argv += ["--ready-fd", str(write_fd)]
    log_path = Path(log_file) if log_file is not None else None
    stderr: Any = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
            env={**os.environ, **(env or {})},
        )
    finally:
        os.close(write_fd)
        if log_path is not None:
            stderr.close()
    handle = MountHandle(point, process.pid, process, log_path)
    try:
        message = _wait_ready(read_fd, process, timeout)
    except BaseException:
        # Interrupted while waiting (Ctrl-C, or SIGTERM turned into SystemExit by the CLI):
        # the daemon runs in its own session, so no signal to our process group reaches it,
        # and the caller never gets the handle that would unmount it.
        _stop_started(handle)
        raise
    finally:
        os.close(read_fd)
    if message != "ready":
        _stop_started(handle)
        raise CvmfsMlError(f"mount of {text} at {point} failed: {message}")
    return handle


def _stop_started(handle: MountHandle) -> None:
    """Stop a daemon :func:`mount` started and will not hand over, and its mount if it made one.

    SIGTERM first: the daemon unmounts before it exits. It may be anywhere in its start, so a
    daemon that does not exit is killed, and a mount it left behind (it mounted but died before
    it could unmount) is detached. Only a cvmfs-ml mount is touched: the folder was no mount
    point when the daemon started.
    """
    process = handle.process
    assert process is not None
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            # A daemon blocked on a request to its own mount outlives SIGKILL until that
            # mount goes: the unmount below must happen all the same.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
    source = mounted_source(handle.mountpoint)
    if source is not None and source.startswith("cvmfs-ml:"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            unmount(handle.mountpoint, lazy=True, timeout=5)
    if process.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _wait_ready(read_fd: int, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([read_fd], [], [], 0.1)
        if readable:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break  # the daemon closed the pipe without a word
            buffer += chunk
            if b"\n" in buffer:
                return buffer.split(b"\n", 1)[0].decode("utf-8", "replace")
        elif process.poll() is not None:
            break
    if process.poll() is not None:
        return buffer.decode("utf-8", "replace").strip() or (
            f"the daemon exited with status {process.returncode}"
        )
    return f"not mounted after {timeout:g} s"
