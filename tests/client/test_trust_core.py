"""The trust core (client/trust.py) and the places that use it: client, ``repo check``, replica.

The repository name always comes from the caller (URL, configuration, folder name): a folder
holding another repository's validly signed files (same master key) is refused. The site
blacklist (upstream's format: fingerprints, ``<fqrn N`` revision lines) is honoured through
``blacklist=``, ``CVMFS_BLACKLIST`` and ``--blacklist``. The core itself is fed bytes and a
clock, so its refusals are tested without any I/O.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.client.config import load_blacklist
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.client.trust import (
    MAX_MANIFEST_BYTES,
    Blacklist,
    BlacklistedError,
    TrustAnchors,
    verify_ensemble,
)
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.cvmfs.manifest import FqrnMismatchError
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.cvmfs.whitelist import certificate_fingerprint
from cvmfs_ml.errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    SignatureError,
    WhitelistExpiredError,
)
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.replica.sync import sync_replica

FQRN = "core.test"
OTHER = "other.test"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("core")
    publisher = create_repository(root / "srv", FQRN)
    with publisher.transaction() as txn:
        txn.add_bytes("/a.txt", b"hello")
        txn.commit()
    return root


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Publisher:
    shutil.copytree(template, tmp_path / "t", symlinks=True)
    return Publisher.open(tmp_path / "t" / "srv" / FQRN)


def master_key(repo: Publisher) -> Path:
    return repo.keys.paths.master_public


def ensemble(repo: Publisher) -> tuple[bytes, bytes, bytes]:
    manifest = repo.manifest()
    assert manifest.certificate is not None
    certificate = repo.repo_dir / object_path(manifest.certificate, ObjectKind.CERTIFICATE)
    return (
        (repo.repo_dir / ".cvmfspublished").read_bytes(),
        (repo.repo_dir / ".cvmfswhitelist").read_bytes(),
        certificate.read_bytes(),
    )


def blacklist_line(repo: Publisher) -> str:
    return certificate_fingerprint(repo.keys.certificate_pem) + " # compromised"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------ the name is the caller's


def test_a_folder_with_another_repositorys_signed_files_is_refused(
    repo: Publisher, tmp_path: Path
) -> None:
    """Same master key, validly signed, but the folder is ``other.test``: not accepted."""
    impostor = tmp_path / "srv2" / OTHER
    shutil.copytree(repo.repo_dir, impostor, symlinks=True)
    with pytest.raises(FqrnMismatchError, match=r"'core\.test', expected 'other\.test'"):
        Repository.open(impostor, public_key=master_key(repo), cache=tmp_path / "c")
    # the genuine folder opens with the same key
    with Repository.open(repo.repo_dir, public_key=master_key(repo), cache=tmp_path / "c") as r:
        assert r.read_bytes("/a.txt") == b"hello"
    # ... and repo check refuses the impostor with one line, no traceback
    result = cli("repo", "check", str(impostor), "--key", str(master_key(repo)))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "expected 'other.test'" in result.stderr
    # ... and so does the replica
    with pytest.raises(FqrnMismatchError):
        sync_replica(impostor, tmp_path / "replica" / OTHER, master_key(repo))


def test_the_name_in_the_manifest_does_not_pick_the_key(repo: Publisher, tmp_path: Path) -> None:
    """A folder's default key is looked up by the folder's name, not by the manifest's N."""
    impostor = tmp_path / "t" / "srv" / OTHER
    shutil.copytree(repo.repo_dir, impostor, symlinks=True)
    result = cli("repo", "ls", str(impostor))
    assert result.returncode == 1
    assert result.stderr.startswith("cvmfs-ml: no public key for"), result.stderr
    genuine = cli("repo", "ls", str(repo.repo_dir))
    assert genuine.returncode == 0 and "a.txt" in genuine.stdout


# ------------------------------------------------------------------ the blacklist


def test_a_blacklisted_certificate_is_refused(repo: Publisher, tmp_path: Path) -> None:
    blacklist = Blacklist.parse(f"# site blacklist\n{blacklist_line(repo)}\n".encode())
    with pytest.raises(BlacklistedError, match=r"certificate .* is blacklisted"):
        Repository.open(repo.repo_dir, public_key=master_key(repo), blacklist=blacklist)
    # an unrelated fingerprint changes nothing
    unrelated = Blacklist.parse(b"AA:" * 19 + b"AA\n")
    with Repository.open(repo.repo_dir, public_key=master_key(repo), blacklist=unrelated) as r:
        assert r.read_bytes("/a.txt") == b"hello"


def test_the_blacklist_file_comes_from_cvmfs_blacklist(
    repo: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blacklist"
    path.write_text(blacklist_line(repo) + "\n")
    monkeypatch.setenv("CVMFS_BLACKLIST", str(path))
    with pytest.raises(BlacklistedError):
        Repository.open(repo.repo_dir, public_key=master_key(repo))
    with pytest.raises(BlacklistedError):
        sync_replica(repo.repo_dir, tmp_path / "replica" / FQRN, master_key(repo))
    monkeypatch.setenv("CVMFS_BLACKLIST", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        Repository.open(repo.repo_dir, public_key=master_key(repo))


def test_check_readers_and_mount_take_a_blacklist_option(repo: Publisher, tmp_path: Path) -> None:
    path = tmp_path / "blacklist"
    path.write_text(blacklist_line(repo) + "\n")
    key = str(master_key(repo))
    refused = cli("repo", "check", str(repo.repo_dir), "--key", key, "--blacklist", str(path))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "blacklisted" in refused.stderr
    assert "Traceback" not in refused.stderr
    fine = cli("repo", "check", str(repo.repo_dir), "--key", key)
    assert fine.returncode == 0, fine.stderr
    for reader in (
        ["repo", "cat", str(repo.repo_dir), "/a.txt"],
        ["model", "ls", str(repo.repo_dir)],
    ):
        refused = cli(*reader, "--key", key, "--blacklist", str(path))
        assert refused.returncode == 1 and "blacklisted" in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1
    missing = cli("repo", "ls", str(repo.repo_dir), "--blacklist", str(tmp_path / "absent"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    (tmp_path / "mnt").mkdir()
    args = [str(repo.repo_dir), str(tmp_path / "mnt"), "--key", key]
    unmounted = cli("mount", *args, "--blacklist", str(tmp_path / "absent"))
    assert unmounted.returncode == 1 and "does not exist" in unmounted.stderr
    assert unmounted.stderr.count("\n") == 1


def test_a_revision_line_refuses_older_revisions(repo: Publisher) -> None:
    revision = repo.manifest().revision
    with pytest.raises(BlacklistedError, match=rf"revision {revision} is blacklisted"):
        Repository.open(
            repo.repo_dir,
            public_key=master_key(repo),
            blacklist=Blacklist.parse(f"<{FQRN} {revision + 1}\n".encode()),
        )
    allowed = Blacklist.parse(f"<{FQRN} {revision}\n<{OTHER} 99\n".encode())
    with Repository.open(repo.repo_dir, public_key=master_key(repo), blacklist=allowed) as r:
        assert r.revision == revision


def test_load_blacklist_defaults(tmp_path: Path) -> None:
    assert not load_blacklist(env={})  # no /etc/cvmfs/blacklist here: nothing is blacklisted
    (tmp_path / "b").write_bytes(b"<a.b 3\n<a.b 5\nnot a fingerprint\n" + b"AB:" * 19 + b"AB\n")
    loaded = load_blacklist(env={"CVMFS_BLACKLIST": str(tmp_path / "b")})
    assert loaded.min_revisions == {"a.b": 5} and len(loaded.fingerprints) == 1
    with pytest.raises(ConfigError):
        load_blacklist(tmp_path / "absent", env={})
    with pytest.raises(ConfigError, match="bad revision"):
        (tmp_path / "bad").write_bytes(b"<a.b three\n")
        load_blacklist(tmp_path / "bad")


# ------------------------------------------------------------------ the core: bytes and a clock


def test_core_verifies_bytes_with_a_clock(repo: Publisher) -> None:
    manifest, whitelist, certificate = ensemble(repo)
    anchors = TrustAnchors(FQRN, load_public_keys(master_key(repo)))
    now = dt.datetime.now(dt.UTC)
    trusted = verify_ensemble(anchors, manifest, whitelist, certificate, now)
    assert trusted.manifest == repo.manifest()
    assert trusted.certificate == repo.keys.certificate_pem
    with pytest.raises(WhitelistExpiredError):
        verify_ensemble(anchors, manifest, whitelist, certificate, now + dt.timedelta(days=400))
    with pytest.raises(FqrnMismatchError):
        verify_ensemble(
            TrustAnchors(OTHER, anchors.master_keys), manifest, whitelist, certificate, now
        )
    with pytest.raises(IntegrityError):
        verify_ensemble(anchors, manifest, whitelist, certificate + b"x", now)
    with pytest.raises(FormatError, match="larger than"):
        verify_ensemble(anchors, manifest + b"N" * MAX_MANIFEST_BYTES, whitelist, certificate, now)
    with pytest.raises(SignatureError, match="no master public key"):
        verify_ensemble(TrustAnchors(FQRN, []), manifest, whitelist, certificate, now)
    tampered = manifest.replace(b"\nS", b"\nS9", 1)
    with pytest.raises(SignatureError):
        verify_ensemble(anchors, tampered, whitelist, certificate, now)


def test_the_core_does_no_io() -> None:
    """trust.py is fed bytes and a clock: no file, socket or clock of its own."""
    import ast

    import cvmfs_ml.client.trust as trust

    tree = ast.parse(Path(trust.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"os", "io", "pathlib", "socket", "urllib3", "http", "time", "shutil"}
    calls = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert "open" not in calls
    assert not any(
        isinstance(n, ast.Attribute) and n.attr in ("now", "utcnow", "today")
        for n in ast.walk(tree)
    )


def test_cvmfs_blacklist_from_a_configuration_file(repo: Publisher, tmp_path: Path) -> None:
    from cvmfs_ml.client.config import load_config
    from cvmfs_ml.client.locate import open_target
    from cvmfs_ml.storage.http import RepositoryServer

    (tmp_path / "blacklist").write_text(blacklist_line(repo) + "\n")
    with RepositoryServer(repo.repo_dir.parent) as server:
        config = tmp_path / "site.conf"
        config.write_text(
            f"CVMFS_SERVER_URL={server.url}/cvmfs/@fqrn@\n"
            f"CVMFS_PUBLIC_KEY={master_key(repo)}\n"
            f"CVMFS_CACHE_BASE={tmp_path / 'cache'}\n"
            f"CVMFS_BLACKLIST={tmp_path / 'blacklist'}\n"
        )
        with pytest.raises(BlacklistedError):
            open_target(FQRN, config_files=[config], env={})
        from cvmfs_ml.client.session import open_configured

        with pytest.raises(BlacklistedError):
            open_configured(FQRN, load_config(FQRN, [config], env={}))
        config.write_text(config.read_text().replace("CVMFS_BLACKLIST", "#"))
        with open_target(FQRN, config_files=[config], env={}) as opened:
            assert opened.read_bytes("/a.txt") == b"hello"


def test_a_symlink_named_after_the_repository_opens_it(repo: Publisher, tmp_path: Path) -> None:
    """The folder's name as given is the repository's: a link named ``core.test`` works, a
    link named otherwise is refused although it points at the very same files."""
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / FQRN).symlink_to(repo.repo_dir)
    (tmp_path / "named" / OTHER).symlink_to(repo.repo_dir)
    with Repository.open(tmp_path / "named" / FQRN, public_key=master_key(repo)) as opened:
        assert opened.fqrn == FQRN and opened.read_bytes("/a.txt") == b"hello"
    with pytest.raises(FqrnMismatchError):
        Repository.open(tmp_path / "named" / OTHER, public_key=master_key(repo))
