"""``skopeo copy`` of a small image built here: pushed with a token, pulled back, same digests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from ._helpers import FQRNS, RegistryEnv, RegistryServer, get, wait_until

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _image_layout(layout: Path) -> str:
    """An OCI image layout with one small layer; returns the manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (
            ("etc/hello.txt", b"hello from a layer\n"),
            ("bin/tool", b"#!/bin/sh\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o755
            tar.addfile(info, io.BytesIO(data))
    layer_tar = raw.getvalue()
    layer = _blob(layout, gzip.compress(layer_tar, mtime=0))
    config = _blob(layout, json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]},
        "config": {},
    }).encode())  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }).encode()  # fmt: skip
    entry = _blob(layout, manifest)
    named = {"org.opencontainers.image.ref.name": "1"}
    index = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, **entry,
                                                "annotations": named}]}  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    return str(entry["digest"])


def test_skopeo_copy_pushes_and_pulls_the_same_digests(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path
) -> None:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        if os.environ.get("CI"):
            pytest.fail("skopeo is not installed; CI must provide it (.ci/install)")
        pytest.skip("skopeo is not installed")
    digest = _image_layout(tmp_path / "image")
    target = f"docker://127.0.0.1:{registry.port}/grp/img:1"
    creds = f"ci:{registry_env.tokens['writer']}"
    common = ["--insecure-policy"]
    push = subprocess.run(
        [skopeo, *common, "copy", "--dest-tls-verify=false", "--dest-creds", creds,
         f"oci:{tmp_path / 'image'}:1", target],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert push.returncode == 0, push.stderr
    inspect = subprocess.run(
        [skopeo, *common, "inspect", "--raw", "--tls-verify=false", target],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert inspect.returncode == 0, inspect.stderr
    assert "sha256:" + hashlib.sha256(inspect.stdout).hexdigest() == digest
    pull = subprocess.run(
        [skopeo, *common, "copy", "--src-tls-verify=false", target, f"oci:{tmp_path / 'back'}:1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    pushed = sorted(p.name for p in (tmp_path / "image" / "blobs" / "sha256").iterdir())
    pulled = sorted(p.name for p in (tmp_path / "back" / "blobs" / "sha256").iterdir())
    assert pulled == pushed
    # The image is unpacked and published in DUCC's layout, behind its public link.
    state = wait_until(
        lambda: (s := json.loads(get(registry, "/api/v1/oci/grp/img/1").data))["state"]
        in ("published", "failed", "skipped") and s, 120, registry.logs,
    )  # fmt: skip
    assert state["state"] == "published", state
    public = f"/127.0.0.1:{registry.port}/grp/img:1"
    assert state["model"] == public
    assert registry_env.read(FQRNS[0], f"{public}/etc/hello.txt") == b"hello from a layer\n"
    # Without credentials the push is refused.
    refused = subprocess.run(
        [skopeo, *common, "copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'image'}:1",
         f"docker://127.0.0.1:{registry.port}/grp/img:2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0
    assert get(registry, "/v2/grp/img/manifests/2").status == 404
