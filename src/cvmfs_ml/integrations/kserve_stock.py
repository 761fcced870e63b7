"""KServe's stock storage initializer as a process, for comparisons with ours.

``python -m cvmfs_ml.integrations.kserve_stock DEST URI [URI ...]`` downloads every URI into
``DEST`` with ``kserve_storage.Storage.download_files`` (the real package: its ``http(s)://``
path is what a stock initializer runs for a model on a web server), in its own process as an
init container would be. ``benchmarks/bench_kserve.py`` times it beside ``cvmfs-ml kserve-init``
and a mount. A failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["download", "main"]


def download(dest: str, uris: Sequence[str]) -> None:
    """Every URI into ``dest`` through ``kserve_storage`` (one destination for all)."""
    from kserve_storage import Storage

    Storage.download_files(list(uris), [dest] * len(uris))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m cvmfs_ml.integrations.kserve_stock DEST URI [URI ...]",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        download(args[0], args[1:])
    except Exception as exc:  # whatever kserve_storage raises: one line, as an initializer
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"kserve_storage download failed: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
