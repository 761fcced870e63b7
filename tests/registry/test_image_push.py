"""A container image pushed with ``skopeo copy`` lands in DUCC's layout, as ``sync`` puts it.

``/.flat/<c[0:2]>/<c>/`` (``c``: the config digest) holds the layers applied in order (a
whiteout included), ``/<registry>/<repository>:<tag>`` links to it, and the tree equals an
independent ``skopeo copy ... dir:`` unpack. Pushing the same image again publishes nothing;
another tag of it only adds a link.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cvmfs_ml.client.repository import Repository
from sync.imagebuild import independent_unpack, make_layer, published_tree, write_oci_layout

from ._helpers import FQRNS, RegistryEnv, RegistryServer, get, wait_until


def _push(layout: Path, tag: str, target: str, creds: str) -> None:
    done = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "--dest-creds",
         creds, "--preserve-digests", f"oci:{layout}:{tag}", target],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _settled(registry: RegistryServer, path: str) -> dict:
    return wait_until(
        lambda: (s := json.loads(get(registry, path).data))["state"]
        in ("published", "failed", "skipped") and s, 120, registry.logs,
    )  # fmt: skip


def test_a_pushed_image_is_published_flat_with_its_public_link(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    lower = make_layer([("etc", None), ("etc/os-release", b"ID=test\n"), ("etc/gone", b"old"),
                        ("bin", None), ("bin/sh", b"#!shell\n"), ("bin/ls", "->sh")],
                       modes={"bin/sh": 0o755})  # fmt: skip
    upper = make_layer([("etc/.wh.gone", b""), ("etc/new.conf", b"k=v\n")])
    config = write_oci_layout(tmp_path / "layout", [(lower, "gzip"), (upper, "gzip")], "1")
    host = f"127.0.0.1:{registry.port}"
    creds = f"ci:{registry_env.tokens['writer']}"
    _push(tmp_path / "layout", "1", f"docker://{host}/grp/base:1", creds)
    state = _settled(registry, "/api/v1/oci/grp/base/1")
    assert state["state"] == "published", state
    hexdigest = config.split(":", 1)[1]
    flat = f"/.flat/{hexdigest[:2]}/{hexdigest}"
    public = f"/{host}/grp/base:1"
    assert state["model"] == public
    publisher = registry_env.publisher()
    with Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public,
                         cache=tmp_path / "cache") as repo:  # fmt: skip
        assert repo.stat(public).symlink == f"../../.flat/{hexdigest[:2]}/{hexdigest}"
        assert repo.stat(flat).is_dir
        assert repo.exists(f"{flat}/.cvmfscatalog")  # one nested catalog per flat image
        assert not repo.exists("/grp/base/1")  # not a model version any more
        tree = published_tree(repo, flat)
        record = json.loads(repo.read_bytes(f"/.metadata/{host}/grp/base:1/image.json"))
    assert record["config_digest"] == config and record["owner"] == "registry-push"
    assert "etc/gone" not in tree and tree["etc/new.conf"][0] == "file"
    assert tree == independent_unpack(host, "grp/base:1", tmp_path / "independent")
    # The same image again: nothing new. Another tag of it: only a link.
    revision = registry_env.revision()
    _push(tmp_path / "layout", "1", f"docker://{host}/grp/base:1", creds)
    assert _settled(registry, "/api/v1/oci/grp/base/1")["state"] == "published"
    assert registry_env.revision() == revision
    _push(tmp_path / "layout", "1", f"docker://{host}/grp/base:stable", creds)
    state = _settled(registry, "/api/v1/oci/grp/base/stable")
    assert state["state"] == "published", state
    assert registry_env.revision() == revision + 1
    assert registry_env.read(FQRNS[0], f"/{host}/grp/base:stable/etc/new.conf") == b"k=v\n"


def test_a_hostile_pushed_image_fails_with_nothing_published(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    hostile = make_layer([("etc", None), ("../escape", b"out of the tree")])
    write_oci_layout(tmp_path / "layout", [(hostile, "gzip")], "1")
    before = registry_env.revision()
    _push(tmp_path / "layout", "1", f"docker://127.0.0.1:{registry.port}/grp/evil:1",
          f"ci:{registry_env.tokens['writer']}")  # fmt: skip
    state = _settled(registry, "/api/v1/oci/grp/evil/1")
    assert state["state"] == "failed" and ".." in state["reason"], state
    assert registry_env.revision() == before
    assert not (tmp_path / "escape").exists()


def test_the_public_registry_name_is_checked() -> None:
    from cvmfs_ml.registry.image_push import image_registry_name

    assert image_registry_name("", "registry.example.org:5000") == "registry.example.org:5000"
    assert image_registry_name("models.cern.ch", "127.0.0.1:5000") == "models.cern.ch"
    for hostile in ("../../etc", "a/b", "", "x..y", "host:99999999"):
        assert image_registry_name("", hostile) == "localhost"
