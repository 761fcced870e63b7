"""The base of every loopback service: a server process with its own folder, started at once.

Each service:

* picks a free port on 127.0.0.1 (or takes one), checks that nothing answers there yet, writes
  its own configuration, logs and pid file into a private temporary folder and never touches
  the system-wide configuration or ports;
* starts in ``__init__`` and returns only when its port accepts connections, or raises
  :class:`ServiceError` with the service's logs in the message;
* is a context manager; ``stop()`` terminates the process and waits for it, ``close()`` also
  removes the temporary folder the service made itself.

The log helpers at the end (:func:`wait_for_records`, :meth:`LoggedService.log_before_marker`)
are how the services read their access logs without sleeping blindly.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Generic, Self, TypeVar

from cvmfs_ml.errors import CvmfsMlError

__all__ = [
    "LOOPBACK",
    "LoggedService",
    "Service",
    "ServiceError",
    "available",
    "find_binary",
    "free_port",
    "read_log",
    "wait_for_records",
]

LOOPBACK = "127.0.0.1"

RecordT = TypeVar("RecordT")

# Debian installs nginx and squid in /usr/sbin, which is not on every user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ServiceError(CvmfsMlError, RuntimeError):
    """A service did not start (or stop) as expected; the message carries its logs.

    Also a :class:`RuntimeError`, which it was before it joined the cvmfs-ml hierarchy.
    """


def find_binary(name: str) -> str | None:
    """Return the full path of ``name`` on PATH or in the sbin folders, or None."""
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def available(name: str) -> bool:
    """Whether the service binary ``name`` (nginx, squid, docker-registry) is installed."""
    return find_binary(name) is not None


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free a moment ago.

    Another process may take it before the service binds it; :class:`Service` retries with a new
    port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Service:
    """A server process on loopback with its own folder, started on construction.

    Subclasses set ``binary`` and implement :meth:`_prepare` (write configuration for
    ``self.port``) and :meth:`_command`. ``log_files`` lists what :meth:`logs` shows.
    """

    binary: str = ""
    stop_signal: int = signal.SIGTERM
    start_timeout: float = 60.0  # a deadline, not a wait: a loaded machine starts slowly
    stop_timeout: float = 10.0

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        path = find_binary(self.binary)
        if path is None:
            raise ServiceError(f"{self.binary} is not installed (not on PATH or in /usr/sbin)")
        self.binary_path = path
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix=f"cvmfs-ml-{self.binary}-"))
            if workdir is None
            else Path(workdir)
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._start(port)
        except BaseException:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    # -- public API --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def log_files(self) -> list[Path]:
        """The files :meth:`logs` shows; subclasses add their own."""
        return [self.workdir / "output.log"]

    def logs(self) -> str:
        """All of the service's logs, each under a header, for error messages."""
        parts = []
        for path in self.log_files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path} ---\n{text.rstrip()}")
        return "\n".join(parts) if parts else "(no logs written)"

    def terminate(self) -> None:
        """Ask the service to exit without waiting (stop several at once, then ``stop()``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)

    def stop(self) -> None:
        """Terminate the service and wait for it; kill it if it does not exit in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            # Our process started its own session, so its group holds only its own children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=self.stop_timeout)

    def close(self) -> None:
        """Stop the service and remove its folder when the service created that folder."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, workdir={str(self.workdir)!r})"

    # -- subclass hooks ----------------------------------------------------------------------

    def _prepare(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}._prepare")

    def _command(self) -> Sequence[str]:
        raise NotImplementedError(f"{type(self).__name__}._command")

    def _after_stop(self) -> None:
        """Clean-up after the process exited (subclasses)."""

    # -- start-up ----------------------------------------------------------------------------

    def _start(self, port: int | None) -> None:
        """Start on ``port``, or on free ports (three tries if another process grabs one)."""
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self.port = port if port is not None else free_port()
            try:
                self._launch()
                return
            except ServiceError as error:
                in_use = "in use" in str(error).lower()
                if not in_use or attempt == attempts - 1:
                    raise

    def _launch(self) -> None:
        # The readiness check only sees that *something* answers on the port, so make sure
        # nothing else does before we start.
        if _port_answers(self.port):
            raise ServiceError(f"{self.binary}: port {self.port} is already in use")
        self._prepare()
        with open(self.workdir / "output.log", "ab") as output:
            self.process = subprocess.Popen(
                list(self._command()),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._after_stop()
                raise ServiceError(
                    f"{self.binary} exited with status {self.process.returncode} while starting "
                    f"on port {self.port}\n{self.logs()}"
                )
            if _port_answers(self.port):
                return
            time.sleep(0.05)
        self.stop()
        self._after_stop()
        raise ServiceError(
            f"{self.binary} did not answer on port {self.port} within {self.start_timeout:.0f} s"
            f"\n{self.logs()}"
        )


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_records(
    read: Callable[[], list[RecordT]], expect: int, timeout: float
) -> list[RecordT]:
    """Re-read a log until it holds ``expect`` records or ``timeout`` passes.

    Servers write the log line after the response went out, so a client can be faster than the
    log; waiting for the count the test expects avoids that race without sleeping blindly.
    """
    deadline = time.monotonic() + timeout
    records = read()
    while len(records) < expect and time.monotonic() < deadline:
        time.sleep(0.02)
        records = read()
    return records


class LoggedService(Service, Generic[RecordT]):
    """A service that writes an access log, ``workdir/access.log``, read by :meth:`parse_log`."""

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def parse_log(self, text: str) -> list[RecordT]:
        raise NotImplementedError(f"{type(self).__name__}.parse_log")

    def _log_records(self) -> list[RecordT]:
        return self.parse_log(read_log(self.access_log))

    def requests(self, expect: int = 0, timeout: float = 60.0) -> list[RecordT]:
        """The access log as records, after waiting (up to ``timeout``) for ``expect`` of them.

        The wait ends as soon as they are there; the long default is for loaded machines.
        """
        return wait_for_records(self._log_records, expect, timeout)

    def log_before_marker(self, marker: str, path: str, timeout: float,
                          headers: dict[str, str] | None = None) -> str:  # fmt: skip
        """The access log up to the line of a marker request sent now (``GET path``, whose
        line holds ``marker``), without that line.

        A server logs a request after its answer went out, so a client that is done can be ahead
        of the log. The services here run one process that answers and logs requests one at a
        time (nginx ``worker_processes 1``, Squid ``-N``), so every request answered before the
        marker was sent is logged before it: nothing is missing, and no wait is guessed.
        """
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + timeout
        while True:
            lines = read_log(self.access_log).splitlines(keepends=True)
            at = next((i for i, line in enumerate(lines) if marker in line), None)
            if at is not None:
                return "".join(lines[:at])
            if time.monotonic() > deadline:
                raise ServiceError(f"{type(self).__name__} did not log {marker} in {timeout:g} s")
            time.sleep(0.02)
