"""``cvmfs-ml kserve-init URI DEST ...``: KServe's storage-initializer contract for ``cvmfs://``.

With and without a mount, the destination must be a folder from which onnxruntime gives the
same output as from the original model; so must the real ``kserve_storage.Storage.download``
on a path inside the mount. Bad URIs fail with one line and leave every destination untouched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from .conftest import FQRN, Site, onnx_output

pytestmark = pytest.mark.service


def init(site: Site, *args: str | Path, code: int = 0, env: dict[str, str] | None = None) -> str:
    """Run the initializer as KServe would (a process); check the exit code; return stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "kserve-init", *map(str, args)],
        env=env or site.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == code, (result.stdout, result.stderr)
    if code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), result.stderr
    return result.stderr


def test_initializer_without_a_mount_copies_and_verifies(site: Site, tmp_path: Path) -> None:
    models, single = tmp_path / "mnt-models", tmp_path / "single"
    models.mkdir()  # KServe hands over an existing, empty emptyDir
    log = init(site, f"cvmfs://{FQRN}/hep/mlp:prod", models,
               f"cvmfs://{FQRN}/hep/mlp/2.0/model.onnx", single)  # fmt: skip
    assert "copy from" in log
    assert not (models / "model.onnx").is_symlink()
    np.testing.assert_array_equal(onnx_output(models), onnx_output(site.originals["1.0"]))
    assert sorted(os.listdir(single)) == ["model.onnx"]
    np.testing.assert_array_equal(onnx_output(single), onnx_output(site.originals["2.0"]))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging left behind"


def test_initializer_and_kserve_storage_with_a_mount(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    from kserve_storage import Storage

    mount_site()
    version = site.mounts / FQRN / "hep" / "mlp" / "1.0"
    expected = onnx_output(site.originals["1.0"])
    stock = Storage.download(str(version), str(tmp_path / "stock"))
    np.testing.assert_array_equal(onnx_output(Path(stock)), expected)

    dest = tmp_path / "ours"
    log = init(site, f"cvmfs://{FQRN}/hep/mlp:prod", dest)
    assert "link from" in log
    assert os.readlink(dest / "model.onnx") == str(version / "model.onnx")
    np.testing.assert_array_equal(onnx_output(dest), expected)
    # Both give the same folder: links to the same files of the mount.
    assert sorted(os.listdir(dest)) == sorted(os.listdir(stock))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        (
            "cvmfs://other.test.org/hep/mlp:prod",
            "other.test.org/.cvmfspublished via DIRECT: HTTP 404",
        ),
        (f"cvmfs://{FQRN}/hep/mlp:nope", "no such file"),
        (f"cvmfs://{FQRN}/hep/nothing/here.onnx", "no such file"),
        (f"cvmfs://{FQRN}/hep/../../etc/passwd", "'..' are not allowed"),
        ("s3://bucket/model", "not a cvmfs://"),
        ("cvmfs://bad name/x", "not a repository name"),
    ],
)
def test_bad_uris_write_nothing(site: Site, tmp_path: Path, uri: str, reason: str) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    # The good pair comes first: it must not be written either when a later one is bad.
    line = init(site, f"cvmfs://{FQRN}/hep/mlp:1.0", good, uri, bad, code=1)
    assert reason in line
    assert not good.exists() and not bad.exists()


def test_unreachable_server_and_odd_arguments(site: Site, tmp_path: Path) -> None:
    config = tmp_path / "down.conf"
    text = site.config.read_text().replace(site.server.url, f"http://127.0.0.1:{_closed_port()}")
    config.write_text(text)
    env = {**site.env, "CVMFS_ML_CONFIG": str(config)}
    dest = tmp_path / "dest"
    dest.mkdir()
    line = init(site, f"cvmfs://{FQRN}/hep/mlp:1.0", dest, code=1, env=env)
    assert "could not fetch .cvmfspublished" in line and os.listdir(dest) == []
    assert "URI DEST pairs" in init(site, f"cvmfs://{FQRN}/hep/mlp:1.0", code=1)
    twice = init(site, f"cvmfs://{FQRN}/hep/mlp:1.0", dest, f"cvmfs://{FQRN}/hep/mlp:2.0",
                 dest, code=1)  # fmt: skip
    assert "its own DEST" in twice
    (dest / "mine").write_text("x")
    assert "not empty" in init(site, f"cvmfs://{FQRN}/hep/mlp:1.0", dest, code=1)
    assert os.listdir(dest) == ["mine"]


def test_stock_download_process_fetches_the_same_model(site: Site, tmp_path: Path) -> None:
    """``python -m cvmfs_ml.integrations.kserve_stock`` (the benchmark's stock path): the real
    ``kserve_storage`` over HTTP gives a folder with the original's output; a missing file is
    one line and exit 1."""
    from cvmfs_ml.storage.http import RepositoryServer

    served = tmp_path / "served"
    (served / "origin").mkdir(parents=True)
    for item in site.originals["2.0"].iterdir():
        (served / "origin" / item.name).write_bytes(item.read_bytes())
    with RepositoryServer(served, plain_folders=("origin",)) as http:
        base = f"{http.url}/cvmfs/origin"

        def stock(dest: Path, *names: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "cvmfs_ml.integrations.kserve_stock", str(dest),
                 *(f"{base}/{n}" for n in names)],
                env=site.env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip

        done = stock(tmp_path / "stock", "model.onnx", "labels.txt")
        assert done.returncode == 0, done.stderr[-2000:]
        np.testing.assert_array_equal(onnx_output(tmp_path / "stock"),
                                      onnx_output(site.originals["2.0"]))  # fmt: skip
        failed = stock(tmp_path / "none", "absent.onnx")
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert lines[0].startswith("kserve_storage download failed")


def test_the_initializer_needs_only_the_base_install(site: Site, tmp_path: Path) -> None:
    """The initializer image installs cvmfs-ml without extras: ``kserve-init`` (no mount)
    must work with every extras-only package refused at import."""
    from .base_install import extras_only_modules

    launcher = Path(__file__).with_name("base_install.py")
    blocked = extras_only_modules()
    assert {"onnxruntime", "onnx", "kserve", "pyfuse3", "yaml"} <= blocked  # really refused
    assert not blocked & {"numpy", "typer", "rich", "cryptography", "urllib3"}
    dest = tmp_path / "dest"
    done = subprocess.run(
        [sys.executable, str(launcher), "kserve-init", "--copy", f"cvmfs://{FQRN}/hep/mlp:prod",
         str(dest)], env=site.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "copy from" in done.stderr
    np.testing.assert_array_equal(onnx_output(dest), onnx_output(site.originals["1.0"]))


def test_initializer_fills_a_volume_root_as_kserve_hands_it_over(
    site: Site, mount_site: Callable[[], object], tmp_path: Path
) -> None:
    """In a pod ``/mnt/models`` is an emptyDir volume: its own mount point. The copy was staged
    beside it (``/mnt/.models.partial-*``) and moved in by rename, which cannot cross a mount
    point: every copy failed with "Invalid cross-device link" (and every link from a mount)."""
    from disks import small_tmpfs

    with small_tmpfs(tmp_path / "mnt" / "models", "8m") as models:
        init(site, f"cvmfs://{FQRN}/hep/mlp:prod", models)
        assert not (models / "model.onnx").is_symlink()
        np.testing.assert_array_equal(onnx_output(models), onnx_output(site.originals["1.0"]))
        assert not [p for p in os.listdir(models) if p.startswith(".")], "staging left inside"
        assert os.listdir(tmp_path / "mnt") == ["models"], "staging left beside"
    with small_tmpfs(tmp_path / "mnt" / "tiny", "4k") as tiny:  # too small: fails, left empty
        failed = init(site, f"cvmfs://{FQRN}/hep/mlp:prod", tiny, code=1)
        assert f"{tiny}: no space left on the device" in failed, failed
        assert os.listdir(tiny) == []
    with small_tmpfs(tmp_path / "mnt" / "linked", "1m") as linked:
        mount_site()
        init(site, f"cvmfs://{FQRN}/hep/mlp:2.0", linked)
        assert (linked / "model.onnx").is_symlink()
        np.testing.assert_array_equal(onnx_output(linked), onnx_output(site.originals["2.0"]))
        assert sorted(os.listdir(tmp_path / "mnt")) == ["linked", "models", "tiny"]


def test_a_later_failing_copy_takes_back_the_earlier_ones(site: Site, tmp_path: Path) -> None:
    """The second pair's copy failing (its volume full) left the first DEST filled, although
    the initializer "writes nothing" on an error; a restarted init container then found that
    emptyDir not empty and failed for ever."""
    from disks import small_tmpfs

    made, given = tmp_path / "made", tmp_path / "given"
    given.mkdir()  # as KServe hands it over: existing and empty
    with small_tmpfs(tmp_path / "tiny", "4k") as tiny:
        failed = init(site, f"cvmfs://{FQRN}/hep/mlp:1.0", made, f"cvmfs://{FQRN}/hep/mlp:2.0",
                      given, f"cvmfs://{FQRN}/hep/mlp:prod", tiny, code=1)  # fmt: skip
        assert "no space left" in failed, failed
        assert not made.exists() and os.listdir(given) == [] and os.listdir(tiny) == []
    init(site, f"cvmfs://{FQRN}/hep/mlp:2.0", given)  # the retry works
    np.testing.assert_array_equal(onnx_output(given), onnx_output(site.originals["2.0"]))


def test_a_single_file_copy_is_readable_by_another_user(site: Site, tmp_path: Path) -> None:
    """KServe's model server may run as another user than its initializer. A folder URI's DEST
    was made 0755, but a single file's (``cvmfs://fqrn/ns/name/2.0/model.onnx``) kept the
    staging folder's 0700: a server running as another user could not open the model."""
    single, folder = tmp_path / "single", tmp_path / "folder"
    init(site, f"cvmfs://{FQRN}/hep/mlp/2.0/model.onnx", single, f"cvmfs://{FQRN}/hep/mlp:prod",
         folder)  # fmt: skip
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    assert oct(single.stat().st_mode & 0o777) == "0o755"
    assert (single / "model.onnx").stat().st_mode & 0o444 == 0o444
