"""Sync benchmark (issue 11): registry -> repository, against plain copies of the same content.

Content, generated here and pushed to Debian's ``docker-registry`` on loopback: one model
artifact (a single random weights file, ``oras push``) and one container image (random files
spread over four gzip layers, ``skopeo copy`` from an OCI layout). Sizes are the issue's
(1 GiB artifact, ~200 MB image) times ``--scale``.

Measured in ``--repeats`` interleaved rounds (medians and each round's figures reported; the
ratios are per round), cold registry-side (nothing cached in the repository):

* ``skopeo copy docker://... dir:`` of the image and ``oras pull`` (the oras package) of the
  artifact to local disk: the floor for "download everything"; the pull is timed a second
  time right after (``oras_pull_again_s``, ``ratio_model_vs_pull_again``), into the pages the
  first pull freed, since on VMs that charge for fresh page cache only the pull pays it;
* one ``sync`` round that publishes both (fresh repository), and per-item rounds;
* push-to-published latency: the time from the end of an ``oras push`` of a new tag to the new
  revision's manifest being in place, with the registry's notifications calling the webhook
  (interval one hour) and with polling alone (``--poll-interval``);
* with ``--mount-ttl S``, "a mounted client sees it": the same push, until the new version's
  file exists on a FUSE mount of the repository (HTTP server on loopback, repository TTL ``S``;
  the push lands at a random moment of the mount's check cycle).

Usage::

    python benchmarks/bench_sync.py --scale 0.05     # quick (~60 MB)
    python benchmarks/bench_sync.py                   # the issue's sizes (~1.2 GB)
    python benchmarks/bench_sync.py --mount-ttl 4     # + push -> visible on a FUSE mount
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "tests"))

from cvmfs_ml.publish.repository import create_repository  # noqa: E402
from cvmfs_ml.publish.settings import PublishSettings  # noqa: E402
from cvmfs_ml.sync.engine import SyncOptions, run_round  # noqa: E402
from cvmfs_ml.sync.loop import SyncLoop  # noqa: E402
from cvmfs_ml.sync.webhook import WebhookServer  # noqa: E402
from cvmfs_ml.sync.wishlist import parse_wishlist  # noqa: E402
from cvmfs_ml.testing import DockerRegistry, NotifyingDockerRegistry  # noqa: E402
from sync.imagebuild import make_layer, push_layout, write_oci_layout  # noqa: E402

FQRN = "bench.sync"


def oras_push(host: str, target: str, folder: Path, names: list[str]) -> None:
    import oras.client

    previous = os.getcwd()
    os.chdir(folder)
    try:
        oras.client.OrasClient(insecure=True).push(target=f"{host}/{target}", files=names)
    finally:
        os.chdir(previous)


def timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def wishlist(host: str, image: bool, model: bool) -> Any:
    text = "version: 1\n"
    if image:
        text += f"input: ['http://{host}/bench/image:1']\n"
    if model:
        text += f"models:\n  - source: http://{host}/bench/model:v*\n    name: bench/model\n"
    return parse_wishlist(text)


def latency(
    work: Path, notify: bool, poll_interval: float, mount_ttl: int = 0, image: bool = False
) -> tuple[float, float | None]:
    """Seconds from the end of a push of a new tag to the new revision being published, and
    (with ``mount_ttl``) to its file being readable on a FUSE mount of the repository (served
    over HTTP, TTL ``mount_ttl``). ``image``: a small image pushed with skopeo (a synced image
    behind its public link), else a 1 MiB ``oras push`` (a model version)."""
    token = "bench"
    name = f"{'hook' if notify else 'poll'}-{'image' if image else 'model'}-{mount_ttl}"
    folder = work / f"lat-{name}"
    folder.mkdir(parents=True)
    settings = PublishSettings(ttl=mount_ttl) if mount_ttl else None
    publisher = create_repository(folder / "srv", FQRN, settings=settings)
    spec_path = folder / "wishlist.yaml"
    loop = SyncLoop(publisher, spec_path, interval=3600.0 if notify else poll_interval)
    hook = WebhookServer(loop.notify, token=token).start() if notify else None
    registry = (
        NotifyingDockerRegistry(hook.url, token, workdir=folder / "registry")
        if hook is not None
        else DockerRegistry(workdir=folder / "registry")
    )
    host = registry.host

    def push(tag: str) -> Path:
        """Push version ``tag``; the path of one of its files, relative to the repository."""
        if image:
            layer = make_layer([("etc", None), ("etc/version", tag.encode() + os.urandom(1 << 20))])
            write_oci_layout(folder / f"layout-{tag}", [(layer, "gzip")], tag)
            push_layout(folder / f"layout-{tag}", tag, host, "bench/image")
            return Path(f"{host}/bench/image:{tag}/etc/version")
        (folder / "w.bin").write_bytes(os.urandom(1 << 20))
        oras_push(host, f"bench/model:{tag}", folder, ["w.bin"])
        return Path(f"bench/model/{tag}/w.bin")

    mounted = None
    try:
        push("v1")
        images = f"input: ['http://{host}/bench/image:*']\n"
        models = f"models:\n  - source: http://{host}/bench/model:v*\n    name: bench/model\n"
        spec_path.write_text("version: 1\n" + (images if image else models))
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not loop.reports and time.monotonic() < deadline:
            time.sleep(0.05)
        first = publisher.manifest().revision
        if mount_ttl:
            mounted = _mount(publisher, folder)
            time.sleep(random.uniform(0, mount_ttl))  # land anywhere in the check cycle
        wanted = push("v2")
        pushed = time.perf_counter()
        deadline = time.monotonic() + 10 * max(poll_interval, 10)
        while publisher.manifest().revision == first and time.monotonic() < deadline:
            time.sleep(0.02)
        published = time.perf_counter() - pushed
        if mounted is None:
            return published, None
        point = mounted[1]
        deadline = time.monotonic() + 3 * mount_ttl + 60
        while not (point / wanted).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"the mount never showed {wanted}")
            time.sleep(0.02)
        return published, time.perf_counter() - pushed
    finally:
        if mounted is not None:
            mounted[0].unmount()
            mounted[2].stop()
        loop.stop()
        if hook is not None:
            hook.stop()
        registry.close()


def _mount(publisher: Any, folder: Path) -> tuple[Any, Path, Any]:
    """A FUSE mount of ``publisher``'s repository through a local HTTP server."""
    from cvmfs_ml.client.mounts import mount
    from cvmfs_ml.storage.http import RepositoryServer

    server = RepositoryServer(publisher.repo_dir.parent).start()
    point = folder / "mnt"
    point.mkdir()
    handle = mount(f"{server.url}/cvmfs/{FQRN}", point, cache=folder / "cache",
                   public_key=publisher.keys.paths.master_public)  # fmt: skip
    return handle, point, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=10.0)
    parser.add_argument(
        "--mount-ttl", type=int, default=0, help="also push -> visible on a FUSE mount (TTL s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement")
    parser.add_argument("--out", type=Path, default=_ROOT / "bench-out" / "sync.json")
    args = parser.parse_args()
    model_bytes = int(2**30 * args.scale)
    image_bytes = int(200e6 * args.scale)
    results: dict[str, Any] = {
        "scale": args.scale,
        "model_bytes": model_bytes,
        "image_bytes": image_bytes,
    }
    with tempfile.TemporaryDirectory(prefix="bench-sync.") as tmp:
        work = Path(tmp)
        registry = DockerRegistry(workdir=work / "registry")
        try:
            host = registry.host
            (work / "model").mkdir()
            with open(work / "model" / "weights.bin", "wb") as out:
                for _ in range(0, model_bytes, 1 << 24):
                    out.write(os.urandom(min(1 << 24, model_bytes)))
            oras_push(host, "bench/model:v1", work / "model", ["weights.bin"])
            per_layer = image_bytes // 4
            layers = [
                (
                    make_layer([(f"data/l{i}/f{j}", os.urandom(per_layer // 8)) for j in range(8)]),
                    "gzip",
                )
                for i in range(4)
            ]
            write_oci_layout(work / "layout", layers, "1")
            push_layout(work / "layout", "1", host, "bench/image")

            def skopeo_copy(rep: int) -> None:
                subprocess.run(
                    ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                     f"docker://{host}/bench/image:1", f"dir:{work / f'skopeo-{rep}'}"],
                    check=True, capture_output=True,
                )  # fmt: skip

            def oras_pull(rep: int) -> None:
                import oras.client

                oras.client.OrasClient(insecure=True).pull(
                    target=f"{host}/bench/model:v1", outdir=str(work / f"pulled-{rep}")
                )

            # Each measurement once per round, rounds interleaved: this machine's speed drifts
            # (memory the host took back costs CPU to touch again), and a round moves both the
            # copy and the sync; the ratios are per round and their median is reported.
            runs: dict[str, list[float]] = {}
            for rep in range(args.repeats):
                runs.setdefault("skopeo_copy_s", []).append(timed(lambda r=rep: skopeo_copy(r)))
                runs.setdefault("oras_pull_s", []).append(timed(lambda r=rep: oras_pull(r)))
                shutil.rmtree(work / f"skopeo-{rep}")
                shutil.rmtree(work / f"pulled-{rep}")
                # The same pull again right away, into the pages the first one just freed: on
                # VMs that charge for fresh page cache the first pull pays it and the sync (which
                # writes around the page cache) does not, so this is the fairer baseline.
                runs.setdefault("oras_pull_again_s", []).append(timed(lambda r=rep: oras_pull(r)))
                shutil.rmtree(work / f"pulled-{rep}")
                for name, image, model in (
                    ("image", True, False),
                    ("model", False, True),
                    ("both", True, True),
                ):
                    publisher = create_repository(work / f"srv-{name}" / "root", FQRN)
                    spec = wishlist(host, image, model)
                    options = SyncOptions(scratch=work)
                    runs.setdefault(f"sync_{name}_s", []).append(
                        timed(lambda p=publisher, s=spec, o=options: run_round(p, s, o))
                    )
                    runs.setdefault(f"resync_{name}_s", []).append(
                        timed(lambda p=publisher, s=spec, o=options: run_round(p, s, o))
                    )
                    shutil.rmtree(work / f"srv-{name}")
                print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()),
                      file=sys.stderr, flush=True)  # fmt: skip
        finally:
            registry.close()
        copies, pulls = runs["skopeo_copy_s"], runs["oras_pull_s"]
        ratios = {
            "ratio_image": [i / c for i, c in zip(runs["sync_image_s"], copies, strict=True)],
            "ratio_model": [m / p for m, p in zip(runs["sync_model_s"], pulls, strict=True)],
            "ratio_model_vs_pull_again": [
                m / p for m, p in zip(runs["sync_model_s"], runs["oras_pull_again_s"], strict=True)
            ],
            "ratio_both": [b / (c + p) for b, c, p in
                           zip(runs["sync_both_s"], copies, pulls, strict=True)],
        }  # fmt: skip
        for key, values in {**runs, **ratios}.items():
            results[key] = statistics.median(values)
            results[f"{key}_all"] = [round(v, 3) for v in values]
        results["push_to_published_webhook_s"] = latency(work, True, args.poll_interval)[0]
        results["push_to_published_poll_s"] = latency(work, False, args.poll_interval)[0]
        results["poll_interval_s"] = args.poll_interval
        if args.mount_ttl:
            for what, image in (("model", False), ("image", True)):
                for how, notify in (("webhook", True), ("poll", False)):
                    published, visible = latency(
                        work, notify, args.poll_interval, args.mount_ttl, image
                    )
                    results[f"mount_{what}_{how}_published_s"] = published
                    results[f"mount_{what}_{how}_visible_s"] = visible
            results["mount_ttl_s"] = args.mount_ttl
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for key, value in results.items():
        print(f"{key:32} {value:.3f}" if isinstance(value, float) else f"{key:32} {value}")


if __name__ == "__main__":
    main()
