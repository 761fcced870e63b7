"""Issue 9, item 1: hostile archives are refused whole, with one line, and nothing is published.

Each case is a user report from the issue, run through the CLI (``python3 -m cvmfs_ml``) where
the one-line error is the point: exit 1, a single stderr line, the same manifest as before, and a
clean ``repo check``.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import UnsafeInputError
from cvmfs_ml.publish.repository import Publisher


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", *args], capture_output=True, timeout=180
    )


def open_repo(publisher: Publisher) -> Repository:
    return Repository.open(
        str(publisher.repo_dir), public_key=publisher.keys_dir / f"{publisher.fqrn}.pub"
    )


def assert_refused(publisher: Publisher, source: Path, *extra: str, match: str = "") -> str:
    """Publish ``source`` via the CLI; it must fail with one line and change nothing."""
    before = (publisher.repo_dir / ".cvmfspublished").read_bytes()
    result = cli("repo", "publish", str(publisher.repo_dir), str(source), *extra)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), stderr
    assert "Traceback" not in stderr
    assert match.lower() in lines[0].lower(), lines[0]
    assert (publisher.repo_dir / ".cvmfspublished").read_bytes() == before
    with open_repo(publisher) as repo:
        report = check_repository(repo)
    assert report.ok, report.problems
    return lines[0]


def add(archive: tarfile.TarFile, name: str, data: bytes = b"", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    else:
        archive.addfile(info)


def tar_bytes(build, fmt: int = tarfile.PAX_FORMAT) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        build(archive)
    return buffer.getvalue()


def two_files(archive: tarfile.TarFile) -> None:
    add(archive, "a", b"A" * 5000)
    add(archive, "b", b"B" * 5000)


@pytest.fixture
def publisher(make_repo) -> Publisher:  # type: ignore[no-untyped-def]
    return make_repo()


# -- archives read to their end --------------------------------------------------------------------
def test_corrupt_data_in_the_middle_of_a_tgz_is_refused(publisher: Publisher, tmp_path: Path):
    # Level 0 stores the tar bytes as they are: a flipped byte is not a deflate error, only the
    # gzip CRC at the very end of the stream can tell (the case from the issue).
    raw = bytearray(gzip.compress(tar_bytes(two_files), compresslevel=0))
    at = raw.index(b"A" * 100) + 50
    raw[at] ^= 0xFF
    source = tmp_path / "corrupt-data.tar.gz"
    source.write_bytes(bytes(raw))
    assert_refused(publisher, source, match="corrupt")


def test_corrupt_header_in_the_middle_of_a_tgz_is_refused(publisher: Publisher, tmp_path: Path):
    # tarfile takes a broken header for the end: "b" would silently vanish.
    plain = bytearray(tar_bytes(two_files, tarfile.USTAR_FORMAT))
    second = plain.index(b"b\x00")
    plain[second + 148 : second + 156] = b"garbage!"  # the header checksum field
    raw = gzip.compress(bytes(plain), compresslevel=6)
    source = tmp_path / "corrupt-header.tar.gz"
    source.write_bytes(raw)
    assert_refused(publisher, source, match="header")
    plain_source = tmp_path / "corrupt-header.tar"
    plain_source.write_bytes(bytes(plain))
    assert_refused(publisher, plain_source, match="header")


def test_truncated_archives_are_refused(publisher: Publisher, tmp_path: Path) -> None:
    tar = tar_bytes(two_files)
    gz = gzip.compress(tar)
    cases = {
        "half.tar.gz": gz[: len(gz) // 2],
        "no-trailer.tar.gz": gz[:-8],  # the CRC and size are gone
        "no-end-blocks.tar": tar[: tar.index(b"B" * 10) + 5120],  # ends after member b
        "mid-member.tar": tar[: tar.index(b"B" * 10) + 100],
    }
    for name, data in cases.items():
        source = tmp_path / name
        source.write_bytes(data)
        assert_refused(publisher, source, match="truncated")


@pytest.mark.parametrize("data", [b"this is not a tarball\n" * 40, b"\x1f\x8b" + os.urandom(600)])
def test_non_tar_input_is_one_line(publisher: Publisher, tmp_path: Path, data: bytes) -> None:
    source = tmp_path / "junk.tgz"
    source.write_bytes(data)
    assert_refused(publisher, source, match="junk.tgz")


def test_a_good_tgz_bz2_and_xz_publish(publisher: Publisher, tmp_path: Path) -> None:
    for mode in ("w:gz", "w:bz2", "w:xz"):
        source = tmp_path / f"good.{mode[2:]}"
        with tarfile.open(source, mode) as archive:
            two_files(archive)
        result = cli(
            "repo", "publish", str(publisher.repo_dir), str(source), "--at", f"/{mode[2:]}"
        )
        assert result.returncode == 0, result.stderr
    with open_repo(publisher) as repo:
        for kind in ("gz", "bz2", "xz"):
            assert repo.read_bytes(f"/{kind}/b") == b"B" * 5000


# -- members checked against the tree being built ------------------------------------------------
def _archive(tmp_path: Path, name: str, build) -> Path:  # type: ignore[no-untyped-def]
    source = tmp_path / name
    source.write_bytes(tar_bytes(build))
    return source


SYMLINK = {"type": tarfile.SYMTYPE}
HOSTILE = {
    "symlink-chain": (
        lambda a: (
            add(a, "sub", type=tarfile.DIRTYPE),
            add(a, "sub/x", linkname="..", **SYMLINK),
            add(a, "y", linkname="sub/x/../..", **SYMLINK),
        ),
        "escapes",
    ),
    "symlink-chain-reversed": (  # the link used by the chain comes after it in the archive
        lambda a: (
            add(a, "y", linkname="sub/x/../..", **SYMLINK),
            add(a, "sub", type=tarfile.DIRTYPE),
            add(a, "sub/x", linkname="..", **SYMLINK),
        ),
        "escapes",
    ),
    "symlink-loop": (
        lambda a: (add(a, "p", linkname="q", **SYMLINK), add(a, "q", linkname="p", **SYMLINK)),
        "levels",
    ),
    "member-through-symlink": (
        lambda a: (add(a, "d", linkname=".", **SYMLINK), add(a, "d/f", b"x")),
        "not a directory",
    ),
    "member-below-file": (lambda a: (add(a, "f", b"x"), add(a, "f/g", b"y")), "not a directory"),
    "duplicate-changes-type": (
        lambda a: (add(a, "n", b"x"), add(a, "n", type=tarfile.DIRTYPE)),
        "twice",
    ),
    "name-over-255-bytes": (lambda a: add(a, "n" * 256, b"x"), "NAME_MAX"),
    "utf8-name-over-255-bytes": (lambda a: add(a, "é" * 128, b"x"), "NAME_MAX"),
    "path-over-4096-bytes": (lambda a: add(a, "/".join(["d" * 200] * 21), b"x"), "PATH_MAX"),
    "hardlink-to-later-member": (
        lambda a: (add(a, "h", type=tarfile.LNKTYPE, linkname="f"), add(a, "f", b"x")),
        "earlier regular file",
    ),
    "hardlink-to-directory": (
        lambda a: (
            add(a, "d", type=tarfile.DIRTYPE),
            add(a, "h", type=tarfile.LNKTYPE, linkname="d"),
        ),
        "earlier regular file",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_refuse_the_whole_archive(publisher: Publisher, tmp_path: Path, case: str):
    build, reason = HOSTILE[case]
    objects = sorted(publisher.store.list_objects())

    def with_good_first(archive: tarfile.TarFile) -> None:
        add(archive, "good.txt", b"fine\n")
        build(archive)

    assert_refused(publisher, _archive(tmp_path, f"{case}.tar", with_good_first), match=reason)
    assert sorted(publisher.store.list_objects()) == objects  # validated before any write


def test_limits_are_inclusive_and_harmless_links_pass(publisher: Publisher, tmp_path: Path):
    def build(a: tarfile.TarFile) -> None:
        add(a, "n" * 255, b"longest name")
        add(a, "sub", type=tarfile.DIRTYPE)
        add(a, "sub/x", linkname="..", **SYMLINK)  # the root, from inside: fine
        add(a, "sub/up", linkname="x/sub", **SYMLINK)  # through x, back into sub
        add(a, "dangling", linkname="nowhere/../also-nowhere", **SYMLINK)
        # Through a link that comes later in the archive: a/../.. is b/c/../.. = the root.
        add(a, "early", linkname="later/../..", **SYMLINK)
        add(a, "b/c", type=tarfile.DIRTYPE)
        add(a, "later", linkname="b/c", **SYMLINK)

    with publisher.transaction() as txn:
        txn.add_tarball(_archive(tmp_path, "fine.tar", build), "/t")
        txn.commit()
    with open_repo(publisher) as repo:
        assert repo.read_bytes("/t/" + "n" * 255) == b"longest name"
        assert repo.stat("/t/sub/up").symlink == "x/sub"
        assert check_repository(repo).ok


def test_python_api_refuses_before_the_transaction_commits(publisher: Publisher, tmp_path: Path):
    source = _archive(tmp_path, "chain.tar", HOSTILE["symlink-chain"][0])
    with publisher.transaction() as txn, pytest.raises(UnsafeInputError, match="escapes"):
        txn.add_tarball(source)
    assert publisher.manifest().revision == 0


# -- hard links kept as groups ---------------------------------------------------------------------
def test_tar_hard_links_become_hard_link_groups(publisher: Publisher, tmp_path: Path) -> None:
    def build(a: tarfile.TarFile) -> None:
        add(a, "dir", type=tarfile.DIRTYPE)
        add(a, "dir/model.bin", b"weights" * 1000, mode=0o640)
        add(a, "dir/alias.bin", type=tarfile.LNKTYPE, linkname="dir/model.bin")
        add(a, "dir/third.bin", type=tarfile.LNKTYPE, linkname="./dir/model.bin")
        add(a, "other", b"other file")
        add(a, "elsewhere/copy.bin", type=tarfile.LNKTYPE, linkname="dir/model.bin")

    with publisher.transaction() as txn:
        txn.add_tarball(_archive(tmp_path, "links.tar", build), "/m")
        txn.commit()
    with open_repo(publisher) as repo:
        group = [repo.stat(f"/m/dir/{n}") for n in ("model.bin", "alias.bin", "third.bin")]
        assert {e.hardlink_group for e in group} == {1}, [e.hardlinks for e in group]
        assert {e.linkcount for e in group} == {3}
        assert {(e.mode, e.digest, e.size) for e in group} == {
            (group[0].mode, group[0].digest, 7000)
        }
        assert group[0].mode & 0o777 == 0o640
        # Upstream's groups never span directories: a link from elsewhere is a plain copy.
        copy = repo.stat("/m/elsewhere/copy.bin")
        assert (copy.hardlink_group, copy.linkcount) == (0, 1)
        assert repo.read_bytes("/m/elsewhere/copy.bin") == b"weights" * 1000
        other = repo.stat("/m/other")
        assert (other.hardlink_group, other.linkcount) == (0, 1)
        assert check_repository(repo).ok
    # A second group in the same catalog takes the next id.
    with publisher.transaction() as txn:
        txn.add_tarball(_archive(tmp_path, "links.tar", build), "/m2")
        txn.commit()
    with open_repo(publisher) as repo:
        assert repo.stat("/m2/dir/alias.bin").hardlink_group == 2


# -- names are bytes -------------------------------------------------------------------------------
LATIN1 = b"caf\xe9-\xff.txt"  # not UTF-8


def test_non_utf8_names_publish_and_read_back_as_the_same_bytes(
    publisher: Publisher, tmp_path: Path
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / os.fsdecode(LATIN1)).write_bytes(b"from a folder")
    os.symlink(os.fsdecode(LATIN1), folder / os.fsdecode(b"link-\xfe"))
    tar = tmp_path / "names.tar"
    with tarfile.open(
        tar, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        add(archive, os.fsdecode(b"dir-\xe4/" + LATIN1), b"from a tarball")
    for source, at in ((folder, "/f"), (tar, "/t")):
        result = cli("repo", "publish", str(publisher.repo_dir), str(source), "--at", at)
        assert result.returncode == 0, result.stderr
    with open_repo(publisher) as repo:
        names = {os.fsencode(e.name) for e in repo.listdir("/f")}
        assert names == {LATIN1, b"link-\xfe"}
        assert repo.read_bytes("/f/" + os.fsdecode(LATIN1)) == b"from a folder"
        assert os.fsencode(repo.stat("/f/" + os.fsdecode(b"link-\xfe")).symlink) == LATIN1
        path = "/t/" + os.fsdecode(b"dir-\xe4/" + LATIN1)
        assert repo.read_bytes(path) == b"from a tarball"
        assert check_repository(repo).ok
    listing = cli("repo", "ls", str(publisher.repo_dir), "/f")
    assert listing.returncode == 0, listing.stderr
    assert LATIN1 in listing.stdout
    cat = cli("repo", "cat", str(publisher.repo_dir), os.fsdecode(b"/f/" + LATIN1))
    assert cat.returncode == 0 and cat.stdout == b"from a folder", cat.stderr


def test_an_archive_swapped_after_validation_is_refused(publisher: Publisher, tmp_path: Path):
    source = _archive(tmp_path, "swap.tar", two_files)
    with publisher.transaction() as txn:
        txn.add_tarball(source)  # validated now
        source.write_bytes(tar_bytes(lambda a: add(a, "a", b"other bytes entirely")))
        with pytest.raises(UnsafeInputError, match="changed"):
            txn.commit()
    assert publisher.manifest().revision == 0


def test_an_xattr_a_catalog_cannot_hold_is_refused(publisher: Publisher, tmp_path: Path):
    folder = tmp_path / "attrs"
    folder.mkdir()
    (folder / "ok").write_bytes(b"ok")
    big = folder / "big"
    big.write_bytes(b"data")
    try:
        os.setxattr(big, "user.fine", b"x" * 255)
        os.setxattr(big, "user.big", b"x" * 300)
    except OSError as exc:
        pytest.skip(f"no user xattrs on this file system: {exc}")
    assert_refused(publisher, folder, match="user.big")  # nothing published (a folder is
    # read once, so files before it may have left unreferenced objects for gc)
    os.removexattr(big, "user.big")
    result = cli("repo", "publish", str(publisher.repo_dir), str(folder))
    assert result.returncode == 0, result.stderr
    with open_repo(publisher) as repo:
        assert repo.stat("/big").xattrs == {b"user.fine": b"x" * 255}
