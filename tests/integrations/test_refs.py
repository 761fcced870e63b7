"""``cvmfs_ml.resolve``, ``cvmfs-ml model get`` and ``model path``: a model version as a folder.

Against a real HTTP server (no mount: a verified copy from the cache, hard-linked where it can
be) and a real FUSE mount (links into the mount, no copy). onnxruntime must give the same output
from the folder as from the original model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import cvmfs_ml
from cvmfs_ml.errors import CvmfsMlError, UnsafeInputError
from cvmfs_ml.models.refs import parse_ref, parse_uri

from .conftest import FQRN, Site, onnx_output

pytestmark = pytest.mark.service


def cli(site: Site, *args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    """``cvmfs-ml ARGS`` in a subprocess with the site's environment; checks the exit code."""
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *map(str, args)],
        env=site.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == code, (result.stdout, result.stderr)
    if code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), result.stderr
    return result


def test_parse_refs_and_uris() -> None:
    uri = parse_uri(f"cvmfs://{FQRN}/hep/mlp:prod")
    assert (uri.fqrn, uri.path, uri.model and uri.model.version) == (FQRN, "hep/mlp/prod", "prod")
    assert parse_uri(f"cvmfs://{FQRN}//hep//mlp/1.0/model.onnx").path == "hep/mlp/1.0/model.onnx"
    assert parse_ref("hep/mlp:2.0").fqrn is None
    for bad in (f"cvmfs://{FQRN}/hep/../x", f"cvmfs://{FQRN}/a/b/c:1", "s3://bucket/x",
                "cvmfs://../x", f"cvmfs://{FQRN}/hep/mlp:..", f"cvmfs://{FQRN}/a\\b"):  # fmt: skip
        with pytest.raises(UnsafeInputError):
            parse_uri(bad)
    with pytest.raises(UnsafeInputError):
        parse_ref(f"cvmfs://{FQRN}/hep/mlp/1.0")


def test_resolve_without_mount_is_a_verified_copy(site: Site, tmp_path: Path) -> None:
    path = cvmfs_ml.resolve(f"cvmfs://{FQRN}/hep/mlp:prod", config_files=[site.config],
                            env=site.env)  # fmt: skip
    assert path.name == "1.0" and "materialised" in path.parts
    assert sorted(p.name for p in path.iterdir()) == ["labels.txt", "model.json", "model.onnx"]
    assert not (path / "model.onnx").is_symlink()
    np.testing.assert_array_equal(onnx_output(path), onnx_output(site.originals["1.0"]))
    assert not np.array_equal(onnx_output(path), onnx_output(site.originals["2.0"]))
    # Hard-linked from the client's object cache (same file system here): one copy on disk.
    assert (path / "model.onnx").stat().st_nlink >= 2
    # A second resolve reuses the complete copy (no server needed).
    site.server.stop()
    again = cvmfs_ml.resolve(f"cvmfs://{FQRN}/hep/mlp:1.0", config_files=[site.config],
                             env=site.env)  # fmt: skip
    assert again == path


def test_model_get_and_path_cli_without_mount(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "got"
    out = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:latest", dest).stdout
    assert "copied and verified, version 2.0" in out
    np.testing.assert_array_equal(onnx_output(dest), onnx_output(site.originals["2.0"]))
    assert (dest / "labels.txt").read_text() == "version 2.0\n"
    # --repo with a bare reference, and model path
    url = f"{site.server.url}/cvmfs/{FQRN}"
    key = site.publisher.keys.paths.master_public
    printed = cli(site, "model", "path", "hep/mlp:1.0", "--repo", url, "--key", key).stdout
    folder = Path(printed.strip())
    np.testing.assert_array_equal(onnx_output(folder), onnx_output(site.originals["1.0"]))
    # DEST that is not empty is refused and left alone
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    line = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:1.0", tmp_path / "busy", code=1)
    assert "not empty" in line.stderr
    assert os.listdir(tmp_path / "busy") == ["mine.txt"]
    # A mistyped version names what the model has (and fetches nothing into DEST)
    missing = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:9.9", tmp_path / "m", code=1)
    assert "hep/mlp:9.9" in missing.stderr and not (tmp_path / "m").exists()
    assert "hep/mlp has 1.0, 2.0, latest, prod" in missing.stderr, missing.stderr
    unknown = cli(site, "model", "path", f"cvmfs://{FQRN}/hep/nothing:1.0", code=1)
    assert "hep/nothing:1.0" in unknown.stderr and " has " not in unknown.stderr


def test_model_get_onto_a_full_disk_names_it_and_leaves_nothing(site: Site, tmp_path: Path) -> None:
    """A write's ENOSPC names no file, so the line said only "no space left on the device"."""
    from disks import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", "1m") as disk:
        fill(disk / "filler")
        failed = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:1.0", disk / "got", code=1)
        assert f"{disk}: no space left on the device" in failed.stderr, failed.stderr
        assert os.listdir(disk) == ["filler"]


def test_resolve_and_get_link_into_a_mount(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    mount_site()
    path = cvmfs_ml.resolve(f"cvmfs://{FQRN}/hep/mlp:prod", env=site.env,
                            config_files=[site.config])  # fmt: skip
    assert path == site.mounts / FQRN / "hep" / "mlp" / "1.0"  # the alias, resolved once
    np.testing.assert_array_equal(onnx_output(path), onnx_output(site.originals["1.0"]))
    dest = tmp_path / "linked"
    out = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:prod", dest).stdout
    assert "linked from the mount" in out
    assert os.readlink(dest / "model.onnx") == str(path / "model.onnx")
    np.testing.assert_array_equal(onnx_output(dest), onnx_output(site.originals["1.0"]))
    printed = cli(site, "model", "path", "hep/mlp:2.0", "--repo", site.mounts / FQRN).stdout
    assert Path(printed.strip()) == site.mounts / FQRN / "hep" / "mlp" / "2.0"
    by_name = cli(site, "model", "path", "hep/mlp:prod", "--repo", FQRN).stdout  # via the mount
    assert Path(by_name.strip()) == site.mounts / FQRN / "hep" / "mlp" / "1.0"
    missing = cli(site, "model", "path", f"cvmfs://{FQRN}/hep/mlp:9.9", code=1)
    assert "hep/mlp has 1.0, 2.0, latest, prod" in missing.stderr, missing.stderr
    # --copy ignores the mount
    copied = tmp_path / "copied"
    cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:2.0", copied, "--copy")
    assert not (copied / "model.onnx").is_symlink()
    np.testing.assert_array_equal(onnx_output(copied), onnx_output(site.originals["2.0"]))


def test_resolve_errors_are_ours(site: Site) -> None:
    with pytest.raises(CvmfsMlError, match="say which repository"):
        cvmfs_ml.resolve("hep/mlp:1.0", env=site.env)
    with pytest.raises(AttributeError):
        cvmfs_ml.no_such_thing  # noqa: B018


def test_copy_where_hard_links_cannot_cross_file_systems(site: Site, tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to copy across")
    with tempfile.TemporaryDirectory(dir=other) as scratch:
        dest = Path(scratch) / "model"
        cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:2.0", dest)
        assert (dest / "model.onnx").stat().st_nlink == 1  # copied, not linked
        np.testing.assert_array_equal(onnx_output(dest), onnx_output(site.originals["2.0"]))


def test_concurrent_model_path_calls_agree(site: Site) -> None:
    """Several processes materialising the same version at once: one copy, all succeed."""
    argv = [sys.executable, "-m", "cvmfs_ml.cli", "model", "path", f"cvmfs://{FQRN}/hep/mlp:2.0"]
    procs = [subprocess.Popen(argv, env=site.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {Path(out.strip()) for out, _ in outs}
    assert len(paths) == 1
    [path] = paths
    np.testing.assert_array_equal(onnx_output(path), onnx_output(site.originals["2.0"]))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging left"


def test_editing_a_hard_linked_copy_does_not_poison_the_cache(site: Site, tmp_path: Path) -> None:
    path = cvmfs_ml.resolve(f"cvmfs://{FQRN}/hep/mlp:1.0", config_files=[site.config],
                            env=site.env)  # fmt: skip
    weights = path / "model.onnx"
    assert weights.stat().st_nlink >= 2  # shares its inode with the cache object
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, one byte changed, in place
    fresh = tmp_path / "fresh"
    cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:1.0", fresh, "--copy")
    assert (fresh / "model.onnx").read_bytes() == (
        site.originals["1.0"] / "model.onnx"
    ).read_bytes()


def test_model_path_with_repo_keeps_the_copy_in_the_configured_cache(site: Site) -> None:
    """``NS/NAME:V --repo FQRN|URL`` materialised under the system's temporary folder
    (``/tmp/materialised/...``, shared by every user and trusted as complete without asking the
    server) instead of ``CVMFS_CACHE_BASE/materialised``: the FQRN was taken from the reference
    only, so the configuration (``@fqrn@`` in its server URL) did not load."""
    cache_base = site.config.parent / "cache"
    url = f"{site.server.url}/cvmfs/{FQRN}"
    key = site.publisher.keys.paths.master_public
    for repo in (FQRN, url):
        printed = cli(site, "model", "path", "hep/mlp:prod", "--repo", repo, "--key", key).stdout
        folder = Path(printed.strip())
        assert folder == cache_base / "materialised" / FQRN / "hep" / "mlp" / "1.0", printed
        np.testing.assert_array_equal(onnx_output(folder), onnx_output(site.originals["1.0"]))


def test_a_reference_naming_another_repository_than_repo_is_refused(
    site: Site, tmp_path: Path
) -> None:
    """``cvmfs://other.test.org/hep/mlp:prod --repo <models.test.org>`` fetched models.test.org's
    model without a word: a mistyped (or a dev/prod) repository name gave another model."""
    url = f"{site.server.url}/cvmfs/{FQRN}"
    key = site.publisher.keys.paths.master_public
    dest = tmp_path / "got"
    for repo in (url, FQRN, str(site.publisher.repo_dir)):
        failed = cli(site, "model", "get", "cvmfs://other.test.org/hep/mlp:prod", dest,
                     "--repo", repo, "--key", key, code=1)  # fmt: skip
        assert "other.test.org" in failed.stderr and FQRN in failed.stderr, failed.stderr
        assert not dest.exists()
    same = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:prod", dest, "--repo", url,
               "--key", key)  # fmt: skip
    assert "version 1.0" in same.stdout


def test_names_from_the_repository_are_printed_as_text(site: Site, tmp_path: Path) -> None:
    """``model get`` and ``kserve-init`` printed the version an alias named raw: a folder name
    with an escape sequence (anyone can publish one) drove the terminal, a newline split the
    report line."""
    name = "v\x1b]0;owned\x07\nx"
    with site.publisher.transaction() as txn:
        txn.mkdir(f"/hep/mlp/{name}")
        txn.add_bytes(f"/hep/mlp/{name}/a.txt", b"hi\n")
        txn.symlink("/hep/mlp/evil", name)
        txn.commit()
    got = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:evil", tmp_path / "got")
    init = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "kserve-init", f"cvmfs://{FQRN}/hep/mlp:evil",
         str(tmp_path / "init")], env=site.env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    for out in (got.stdout, init.stderr):
        assert len(out.strip().splitlines()) == 1 and "\x1b" not in out and "\x07" not in out, out
        assert "v\\x1b]0;owned" in out, out
    assert (tmp_path / "got" / "a.txt").read_text() == "hi\n"


def test_an_alias_that_is_not_a_sibling_version_is_refused(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    """An alias ``up -> ..`` made ``model path``/``kserve-init`` take the namespace folder for the
    version and copy every model in it (``self -> .``: every version of the model); an alias
    names a version folder beside it, as ``model info`` already required."""
    with site.publisher.transaction() as txn:
        txn.symlink("/hep/mlp/up", "..")
        txn.symlink("/hep/mlp/self", ".")
        txn.commit()
    for alias in ("up", "self"):
        ref = f"cvmfs://{FQRN}/hep/mlp:{alias}"
        failed = cli(site, "model", "path", ref, code=1)
        assert "not a version" in failed.stderr, failed.stderr
        cli(site, "kserve-init", ref, tmp_path / alias, code=1)
        assert not (tmp_path / alias).exists()
    assert not (site.config.parent / "cache" / "materialised").exists()
    mount_site()
    for alias in ("up", "self"):
        failed = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:{alias}", tmp_path / "m",
                     code=1)  # fmt: skip
        assert "not a version" in failed.stderr and not (tmp_path / "m").exists()


def test_a_reference_without_a_version_means_latest(site: Site) -> None:
    """docs/model-layout.md: ``namespace/name`` (meaning ``latest``) is accepted wherever a
    version is looked up; ``model path hep/mlp`` was refused ('expected <ns>/<name>:...')."""
    bare = parse_ref("hep/mlp")
    assert (bare.path, bare.model and bare.model.version) == ("hep/mlp/latest", "latest")
    url = f"{site.server.url}/cvmfs/{FQRN}"
    key = site.publisher.keys.paths.master_public
    printed = cli(site, "model", "path", "hep/mlp", "--repo", url, "--key", key).stdout
    np.testing.assert_array_equal(onnx_output(Path(printed.strip())),
                                  onnx_output(site.originals["2.0"]))  # fmt: skip
    for bad in ("hep", "hep/mlp/1.0", "hep/mlp:"):  # still not references
        with pytest.raises(UnsafeInputError):
            parse_ref(bad)


@pytest.mark.parametrize("dest", ["http://127.0.0.1:9/models/got", "s3://bucket/got"])
def test_model_get_and_kserve_init_refuse_a_url_for_dest(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dest: str
) -> None:
    """DEST is a local folder. ``model get REF http://host/x`` exited 0 having filled a local
    folder ``http:/host/x`` (the URL's ``//`` collapsed), and ``kserve-init`` did the same."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    got = cli(site, "model", "get", f"cvmfs://{FQRN}/hep/mlp:1.0", dest, code=1).stderr
    assert f"{dest} is a URL" in got and "local folder" in got, got
    init = cli(site, "kserve-init", f"cvmfs://{FQRN}/hep/mlp:1.0", dest, code=1).stderr
    assert f"{dest} is a URL" in init and "local folder" in init, init
    assert os.listdir(work) == []
