"""Test helpers: build container images as OCI layouts, push them with skopeo, unpack them back.

The expected tree of an image comes from an independent path: ``skopeo copy docker://... dir:``
(skopeo's own download) and the tar layers applied with :mod:`tarfile` here, with the OCI
whiteout rules written out again, so the sync code is never compared with itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import zstandard

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.publish.repository import Publisher

MTIME = 1_700_000_000
FQRN = "sync.test"


def published(publisher: Publisher) -> Repository:
    """The published repository, read with one cache per repository."""
    return Repository.open(
        publisher.repo_dir,
        public_key=publisher.keys.paths.master_public,
        cache=publisher.repo_dir.parent / "read-cache",
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_layer(entries: list[tuple[str, Any]], **options: Any) -> bytes:
    """A tar layer. Entries: ``(name, bytes)`` file, ``(name, None)`` folder, ``(name, "->t")``
    symlink, ``(name, "=>t")`` hard link; ``options`` may give ``modes={name: mode}`` and
    ``owners={name: uid}`` (gid the same)."""
    modes: dict[str, int] = options.get("modes", {})
    owners: dict[str, int] = options.get("owners", {})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.uid = info.gid = owners.get(name, 0)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, modes.get(name, 0o755)
                tar.addfile(info)
            elif isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            elif isinstance(content, str) and content.startswith("=>"):
                info.type, info.linkname = tarfile.LNKTYPE, content[2:]
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), modes.get(name, 0o644)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def write_oci_layout(
    folder: Path, layers: list[tuple[bytes, str]], tag: str, *, label: str = ""
) -> str:
    """An OCI image layout at ``folder`` (``oci:folder:tag``); layers as ``(tar, compression)``
    with compression ``gzip``, ``zstd`` or ``none``. Returns the config digest."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        (blobs / sha256(data)).write_bytes(data)
        return f"sha256:{sha256(data)}"

    descriptors, diff_ids = [], []
    for tar, compression in layers:
        diff_ids.append(f"sha256:{sha256(tar)}")
        if compression == "gzip":
            data, media = gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compression == "zstd":
            data = zstandard.ZstdCompressor().compress(tar)
            media = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            data, media = tar, "application/vnd.oci.image.layer.v1.tar"
        descriptors.append({"mediaType": media, "digest": put(data), "size": len(data)})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Labels": {"test": label}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_digest = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": descriptors,
        }
    ).encode()
    manifest_digest = put(manifest)
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (folder / "index.json").write_text(json.dumps(index))
    return config_digest


def skopeo(*args: str) -> None:
    done = subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def push_layout(layout: Path, tag: str, registry_host: str, repository: str) -> None:
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{layout}:{tag}",
        f"docker://{registry_host}/{repository}:{tag}",
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def independent_unpack(registry_host: str, reference: str, work: Path) -> dict[str, Any]:
    """``skopeo copy docker://... dir:`` then the layers applied with tarfile, whiteouts included;
    returns :func:`tree_of` the result."""
    work.mkdir(parents=True, exist_ok=True)
    download = work / "skopeo-dir"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry_host}/{reference}",
           f"dir:{download}")  # fmt: skip
    manifest = json.loads((download / "manifest.json").read_text())
    root = work / "rootfs"
    root.mkdir()
    for layer in manifest["layers"]:
        raw = (download / layer["digest"].split(":", 1)[1]).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:4] == b"\x28\xb5\x2f\xfd":
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        written: set[str] = set()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in tar.getmembers():
                name = member.name.lstrip("./")
                parent, _, base = name.rpartition("/")
                if base == ".wh..wh..opq":
                    folder = root / parent
                    for child in list(folder.iterdir()) if folder.is_dir() else []:
                        if str(child.relative_to(root)) not in written:
                            _remove(child)
                    continue
                if base.startswith(".wh."):
                    _remove(root / parent / base[4:])
                    continue
                target = root / name
                written.add(name)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                _remove(target)
                if member.issym():
                    os.symlink(member.linkname, target)
                elif member.islnk():
                    os.link(root / member.linkname, target)
                else:
                    handle = tar.extractfile(member)
                    assert handle is not None
                    target.write_bytes(handle.read())
                    os.chmod(target, member.mode)
    return tree_of(root)


def tree_of(root: Path) -> dict[str, Any]:
    """``{relative path: ("dir",) | ("link", target) | ("file", sha256, mode)}``."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                if not os.access(path, os.R_OK):  # a 0000 file of the image, on a writable tree
                    os.chmod(path, stat.S_IMODE(st.st_mode) | 0o400)
                out[rel] = ("file", sha256(path.read_bytes()), stat.S_IMODE(st.st_mode))
    return out


def published_tree(repo: Any, base: str) -> dict[str, Any]:
    """The same shape as :func:`tree_of`, read from a published repository under ``base``."""
    out: dict[str, Any] = {}
    for entry in repo.walk(base):
        rel = entry.path[len(base) + 1 :]
        if rel == ".cvmfscatalog":
            continue
        if entry.is_symlink:
            out[rel] = ("link", entry.symlink)
        elif entry.is_dir:
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", sha256(repo.read_bytes(entry.path)), stat.S_IMODE(entry.mode))
    return out
