"""What this machine charges for page cache it has not used lately: a probe for read benchmarks.

Why: on a virtual machine whose host backs guest memory lazily and takes back what the guest
frees (virtio-balloon free page reporting, as on this project's Firecracker machines), the
first write into a page costs a fault in the host as well as the guest's own work. Measured
here with this probe (2 GiB): 1.41 s of CPU per GiB written into a new file's page cache,
against 0.18 s into pages just freed; with 256 MiB there was no difference, because the
kernel keeps recently freed memory (``max_waiting_mib``, 1 GiB here) before reporting it.
A cold read through a cache fills fresh page cache twice (the cache files and, on a FUSE
mount, the mounted file's pages: 4 GiB for a 2 GiB file), where ``curl`` to ``/dev/null``
reuses a few socket buffers and fills none: on such a machine much of "cold FUSE against
curl" is this charge, not the client. The probe measures it, so a report can say so.

The probe writes ``size`` bytes into a new file twice, with an ``unlink`` between: the first
pass gets whatever pages the kernel hands out (beyond the pool of recently freed ones, pages
the host has taken back), the second gets the pages the first just freed. Both are thread
CPU seconds per GiB.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["FreshPageCost", "measure_fresh_page_cost", "page_reporting"]

_BLOCK = 1 << 20


@dataclass(frozen=True)
class FreshPageCost:
    """CPU seconds per GiB written into a file's page cache: new pages, and pages just freed."""

    fresh_s_per_gib: float
    reused_s_per_gib: float
    probe_bytes: int
    page_reporting: bool  # the kernel reports freed pages to a host (see page_reporting)

    @property
    def charge_s_per_gib(self) -> float:
        """What fresh pages cost beyond reused ones (0 on a machine without the charge)."""
        return max(0.0, self.fresh_s_per_gib - self.reused_s_per_gib)

    def describe(self) -> str:
        reporting = "on" if self.page_reporting else "off"
        return (
            f"page cache writes: {self.fresh_s_per_gib:.2f} s CPU/GiB into fresh pages, "
            f"{self.reused_s_per_gib:.2f} s into reused ones (free page reporting {reporting})"
        )

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "charge_s_per_gib": round(self.charge_s_per_gib, 3)}


def page_reporting() -> bool:
    """Whether this kernel reports free pages to a hypervisor (``page_reporting`` module)."""
    return Path("/sys/module/page_reporting").is_dir()


def _write_pass(path: Path, size: int, block: memoryview) -> float:
    """Thread CPU seconds to write ``size`` bytes into a new file at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        started = time.thread_time()
        done = 0
        while done < size:
            done += os.write(fd, block[: min(len(block), size - done)])
        return time.thread_time() - started
    finally:
        os.close(fd)


def measure_fresh_page_cost(folder: Path, size: int = 2 << 30) -> FreshPageCost:
    """Probe the page cache charge with ``size`` bytes in ``folder`` (left as it was)."""
    if size <= 0:
        raise ValueError("size must be positive")
    block = memoryview(os.urandom(_BLOCK))
    path = Path(folder) / f".fresh-pages-{uuid.uuid4().hex}"
    try:
        fresh = _write_pass(path, size, block)
        path.unlink()
        reused = _write_pass(path, size, block)
    finally:
        path.unlink(missing_ok=True)
    per_gib = (1 << 30) / size
    return FreshPageCost(round(fresh * per_gib, 3), round(reused * per_gib, 3), size,
                         page_reporting())  # fmt: skip
