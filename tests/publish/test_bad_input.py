"""Bad input gets a clear error and loses nothing: unsafe tarballs, corrupt repositories."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.keys import dump_public_key, generate_rsa_key
from cvmfs_ml.errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    SignatureError,
    UnsafeInputError,
    WhitelistExpiredError,
)
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings


def tarball_with(tmp_path: Path, name: str, build) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    with tarfile.open(path, "w") as archive:
        good = tarfile.TarInfo("ok.txt")
        good.size = 3
        archive.addfile(good, io.BytesIO(b"ok\n"))
        build(archive)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x"):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


UNSAFE = {
    "dotdot": (lambda a: a.addfile(*_member("../escape.txt")), "'..'"),
    "nested-dotdot": (lambda a: a.addfile(*_member("a/../../escape.txt")), "'..'"),
    "absolute": (lambda a: a.addfile(*_member("/etc/passwd")), "absolute"),
    "symlink-escape": (
        lambda a: a.addfile(*_member("link", tarfile.SYMTYPE, "../../outside")),
        "escapes",
    ),
    "symlink-absolute": (
        lambda a: a.addfile(*_member("link", tarfile.SYMTYPE, "/etc/shadow")),
        "absolute",
    ),
    "hardlink-escape": (lambda a: a.addfile(*_member("hl", tarfile.LNKTYPE, "../x")), "escapes"),
    "device": (lambda a: a.addfile(*_member("dev", tarfile.CHRTYPE)), "device"),
    # Numbers a PAX header carries whole: readers refuse a uid or gid past 32 bits (a stat of it
    # overflows), and SQLite stores no integer past 64 bits. Before, the first was published
    # (a file every reader refuses) and the second ended the publish with an OverflowError.
    "uid-past-32-bits": (lambda a: a.addfile(*_numbered("big-uid", uid=2**40)), "uid"),
    "negative-gid": (lambda a: a.addfile(*_numbered("neg-gid", gid=-1)), "gid"),
    "mtime-past-64-bits": (lambda a: a.addfile(*_numbered("future", mtime=2**70)), "mtime"),
}


def _numbered(name: str, **numbers: int):  # type: ignore[no-untyped-def]
    info, data = _member(name)
    for key, value in numbers.items():
        setattr(info, key, value)
    return info, data


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_tarballs_are_refused_and_nothing_is_written(
    make_repo, tmp_path: Path, case: str
) -> None:
    build, reason = UNSAFE[case]
    tarball = tarball_with(tmp_path, f"{case}.tar", build)
    publisher = make_repo()
    manifest_before = (publisher.repo_dir / ".cvmfspublished").read_bytes()
    objects_before = sorted(publisher.store.list_objects())
    with publisher.transaction() as txn, pytest.raises(UnsafeInputError, match=reason):
        txn.add_tarball(tarball, "/")
    assert (publisher.repo_dir / ".cvmfspublished").read_bytes() == manifest_before
    assert sorted(publisher.store.list_objects()) == objects_before
    assert not (tmp_path / "escape.txt").exists()


def test_a_safe_relative_symlink_in_a_tarball_is_fine(make_repo, tmp_path: Path) -> None:
    tarball = tarball_with(
        tmp_path,
        "fine.tar",
        lambda a: a.addfile(*_member("dir/link", tarfile.SYMTYPE, "../ok.txt")),
    )
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_tarball(tarball, "/")
        txn.commit()
    with Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public) as r:
        assert r.readlink("/dir/link") == "../ok.txt"
        assert r.read_bytes("/ok.txt") == b"ok\n"


@pytest.fixture
def reference_copy(reference_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of the reference repository to break."""
    target = tmp_path / "ref"
    shutil.copytree(reference_repo, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def open_copy(root: Path, **options) -> Repository:
    return Repository.open(
        root / "cvmfs" / "ref.test.local",
        public_key=root / "keys" / "ref.test.local.pub",
        **options,
    )


def flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_data_object_is_detected(reference_copy: Path) -> None:
    served = reference_copy / "cvmfs" / "ref.test.local"
    with open_copy(reference_copy) as repo:
        piece = repo.layout("/hello.txt").pieces[0]
        flip_byte(served / "data" / piece.digest.hex[:2] / piece.digest.hex[2:])
        with pytest.raises(IntegrityError, match="hash mismatch"):
            repo.read_bytes("/hello.txt")
        report = check_repository(repo)
    assert not report.ok
    assert any("hash mismatch" in p for p in report.problems)


def test_corrupt_catalog_is_refused(reference_copy: Path) -> None:
    served = reference_copy / "cvmfs" / "ref.test.local"
    nested = served / "data" / "5b" / "340614785ceb9ff4d27af317665f44f7272997C"
    flip_byte(nested, 100)
    with open_copy(reference_copy) as repo, pytest.raises(IntegrityError):
        repo.listdir("/nested")


def test_truncated_manifest_is_refused(reference_copy: Path) -> None:
    manifest = reference_copy / "cvmfs" / "ref.test.local" / ".cvmfspublished"
    manifest.write_bytes(manifest.read_bytes()[:-40])
    with pytest.raises((SignatureError, FormatError)):
        open_copy(reference_copy)
    manifest.write_bytes(b"garbage\n")
    with pytest.raises(FormatError):
        open_copy(reference_copy)


def test_tampered_manifest_body_is_refused(reference_copy: Path) -> None:
    manifest = reference_copy / "cvmfs" / "ref.test.local" / ".cvmfspublished"
    manifest.write_bytes(manifest.read_bytes().replace(b"\nD240\n", b"\nD999\n", 1))
    with pytest.raises(SignatureError):
        open_copy(reference_copy)


def test_wrong_key_is_refused(reference_copy: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pub"
    wrong.write_bytes(dump_public_key(generate_rsa_key().public_key()))
    with pytest.raises(SignatureError, match="master key"):
        Repository.open(reference_copy / "cvmfs" / "ref.test.local", public_key=wrong)


def test_expired_whitelist_is_refused(reference_copy: Path) -> None:
    later = dt.datetime(2037, 1, 1, tzinfo=dt.UTC)  # the fixture expires in 2036
    with pytest.raises(WhitelistExpiredError, match="re-sign"):
        open_copy(reference_copy, now=later)


def test_expired_whitelist_of_our_repo_is_fixed_by_resign(make_repo) -> None:
    publisher = make_repo()
    now = dt.datetime.now(dt.UTC)
    publisher.resign(now=now - dt.timedelta(days=40), valid_for=dt.timedelta(days=30))
    key = publisher.keys.paths.master_public
    with pytest.raises(WhitelistExpiredError):
        Repository.open(publisher.repo_dir, public_key=key)
    publisher.resign()
    with Repository.open(publisher.repo_dir, public_key=key) as repo:
        assert repo.revision == 0


@pytest.mark.parametrize(
    "changes",
    [{"ttl": -1}, {"ttl": 0}, {"ttl": 2**32}, {"whitelist_days": 0}, {"whitelist_days": -1},
     {"whitelist_days": 10**9}, {"workers": -1}, {"auto_min_saving": 1.5},
     {"min_chunk_size": 8 << 20, "avg_chunk_size": 4 << 20}],
)  # fmt: skip
def test_settings_no_client_could_use_are_refused_before_anything_is_written(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    """Before, a TTL of -1 failed only when the manifest was signed, after the keys and the
    folder were written (so the corrected command then failed on "key files already exist"),
    and 0 or fewer whitelist days wrote a repository whose whitelist had already expired."""
    with pytest.raises(ConfigError):
        create_repository(tmp_path / "srv", "t.test", settings=PublishSettings().with_(**changes))
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_resign_refuses_a_whitelist_that_would_be_expired(make_repo) -> None:
    publisher = make_repo()
    before = (publisher.repo_dir / ".cvmfswhitelist").read_bytes()
    for days in (0, -1, 10**6):
        with pytest.raises(ConfigError, match="whitelist must be valid"):
            publisher.resign(valid_for=dt.timedelta(days=days))
    assert (publisher.repo_dir / ".cvmfswhitelist").read_bytes() == before


def test_create_with_keys_of_an_earlier_repository_writes_nothing(
    make_repo, tmp_path: Path
) -> None:
    first = make_repo()
    keys = first.keys_dir
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    with pytest.raises(ConfigError, match="already holds keys"):
        create_repository(tmp_path / "other", first.fqrn, keys_dir=keys)
    assert not (tmp_path / "other").exists()
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before
