"""Publish-to-visible on a FUSE mount: how long until a mount shows a new revision.

Publishes a repository with ``CVMFS_REPOSITORY_TTL`` (default 15 s), serves it on loopback,
mounts it, waits a random part of a TTL (a publish lands at any moment of the mount's check
cycle), publishes revision 2 with a moved alias, and polls the mount until ``readlink`` of the
alias shows it. Expect between the daemon's switch time and TTL + switch time; over many runs
about TTL / 2 on average. Also prints how long the daemon's check + switch + invalidation took
(``cvmfs-ml stats``: ``refresh.last_switch_seconds``).

    PYTHONPATH=$PWD/src python3 benchmarks/bench_live.py [--ttl 15] [--out bench-out/live.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from cvmfs_ml.client.mount_control import read_mount_stats
from cvmfs_ml.client.mounts import mount
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

FQRN = "live.bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ttl", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-live.") as tmp:
        base = Path(tmp)
        publisher = create_repository(
            base / "srv", FQRN, settings=PublishSettings(ttl=args.ttl, workers=2)
        )
        with publisher.transaction() as txn:
            txn.add_bytes("/models/m/1/model.bin", os.urandom(1 << 20))
            txn.symlink("/models/m/prod", "1")
            txn.commit()
        server = RepositoryServer(publisher.repo_dir.parent).start()
        point = base / "mnt"
        point.mkdir()
        handle = mount(f"{server.url}/cvmfs/{FQRN}", point, cache=base / "cache",
                       public_key=publisher.keys.paths.master_public)  # fmt: skip
        try:
            alias = point / "models/m/prod"
            assert os.readlink(alias) == "1"
            time.sleep(random.uniform(0, args.ttl))  # land anywhere in the check cycle
            with publisher.transaction() as txn:
                txn.add_bytes("/models/m/2/model.bin", os.urandom(1 << 20))
                txn.symlink("/models/m/prod", "2")
                txn.commit()
            published = time.monotonic()
            deadline = published + 3 * args.ttl + 30
            while os.readlink(alias) != "2":
                if time.monotonic() > deadline:
                    raise SystemExit(f"not visible after {deadline - published:.0f} s")
                time.sleep(0.05)
            visible = time.monotonic() - published
            stats = read_mount_stats(point)
        finally:
            handle.unmount()
            server.stop()
    result = {
        "ttl_seconds": args.ttl,
        "publish_to_visible_seconds": round(visible, 3),
        "daemon_switch_seconds": stats["refresh"]["last_switch_seconds"],
        "checks": stats["refresh"]["checks"],
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
