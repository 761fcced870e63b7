"""Hostile or broken requests: clear 4xx answers, nothing published, the queue keeps working."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

import pytest

from ._helpers import FQRNS, RegistryEnv, RegistryServer, get, make_tarball, post, text, wait_until


def _tar(build) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        build(tar)
    return buffer.getvalue()


def _member(tar: tarfile.TarFile, name: str, **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)


HOSTILE = {
    "dotdot": _tar(lambda t: _member(t, "../evil.txt", size=1)),
    "absolute": _tar(lambda t: _member(t, "/etc/evil", size=1)),
    "symlink-escape": _tar(
        lambda t: _member(t, "a/link", type=tarfile.SYMTYPE, linkname="../../../etc")
    ),
    "device": _tar(lambda t: _member(t, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)),
    "not-a-tarball": b"just some text, not a tarball\n",
    "truncated-gzip": gzip.compress(make_tarball({"a": os.urandom(50_000)}, gz=False))[:30_000],
    "gzip-no-trailer": gzip.compress(make_tarball({"a": b"y" * 50_000}, gz=False))[:-8],
    "cut-member": make_tarball({"a": os.urandom(50_000)}, gz=False)[:20_000],
    "empty": _tar(lambda t: None),
}


@pytest.fixture
def strict(registry_env: RegistryEnv) -> RegistryServer:
    registry_env.set_config(max_upload_bytes=256 * 1024, max_unpacked_bytes=1024 * 1024)
    return registry_env.start()


def _nothing_happened(env: RegistryEnv, server: RegistryServer) -> None:
    assert [env.revision(f) for f in FQRNS] == [0, 0]
    assert list((env.data / "spool").glob("*")) == []
    health = get(server, "/healthz")
    assert health.status == 200


def test_hostile_and_broken_bodies_are_refused(
    registry_env: RegistryEnv, strict: RegistryServer
) -> None:
    token = registry_env.tokens["writer"]
    for name, body in HOSTILE.items():
        response = post(strict, f"/pubapi/publish?cid=grp/{name}", body, token)
        assert response.status == 400, (name, response.data)
        assert text(response).startswith("Bad request: "), name
        assert text(get(strict, f"/pubapi/exists?cid=grp/{name}")) == "MISSING\n"
    # A compression bomb: 4 MiB of zeros in a few KiB of gzip, over the 1 MiB unpacked bound.
    bomb = make_tarball({"zeros": bytes(4 * 2**20)})
    assert len(bomb) < 256 * 1024
    response = post(strict, "/pubapi/publish?cid=grp/bomb", bomb, token)
    assert response.status == 413, response.data
    # A link that stays inside the tarball but leaves the CID once the top folder is stripped.
    sneaky = _tar(
        lambda t: (
            _member(t, "top/f", size=1),
            _member(t, "top/link", type=tarfile.SYMTYPE, linkname="../top2"),
        )
    )
    response = post(strict, "/pubapi/publish?cid=grp/sneaky&striplevels=1", sneaky, token)
    assert response.status == 400 and "leaves the CID" in text(response)
    # Bad striplevels.
    body = make_tarball({"f": b"ok"})
    for strip in ("3", "-1", "x"):
        response = post(
            strict, f"/pubapi/publish?cid=grp/s{strip}&striplevels={strip}", body, token
        )
        assert response.status == 400, (strip, response.data)
    _nothing_happened(registry_env, strict)


INVALID_CIDS = [".hidden", "a/b/c", "it's", "back\\slash", "../up", "grp/..", "grp/", "/abs",
                "x" * 300, "sp ace", "new\nline"]  # fmt: skip


def test_invalid_cids_are_refused(registry_env: RegistryEnv, strict: RegistryServer) -> None:
    from urllib.parse import quote

    token = registry_env.tokens["all"]
    body = make_tarball({"f": b"ok"})
    for cid in INVALID_CIDS:
        for response in (
            post(strict, f"/pubapi/publish?cid={quote(cid)}", body, token),
            get(strict, f"/pubapi/exists?cid={quote(cid)}", token),
        ):
            assert response.status == 400, (cid, response.data)
            assert text(response).startswith("Bad request: "), cid
        # The JSON API takes the CID in the path: 400 (or 404 where it is no route at all).
        response = post(strict, f"/api/v1/cids/{quote(cid, safe='/')}", body, token)
        assert response.status in (400, 404, 405), (cid, response.data)
    assert text(post(strict, "/pubapi/publish", body, token)) == "Bad request: no cid\n"
    _nothing_happened(registry_env, strict)


def test_oversized_bodies_are_refused_with_or_without_length(
    registry_env: RegistryEnv, strict: RegistryServer
) -> None:
    from ._helpers import HTTP

    token = registry_env.tokens["writer"]
    body = make_tarball({"random": os.urandom(300 * 1024)})
    declared = post(strict, "/pubapi/publish?cid=grp/big", body, token)
    assert declared.status == 413 and text(declared).startswith("Request too large")

    def pieces():  # type: ignore[no-untyped-def]
        for start in range(0, len(body), 16384):
            yield body[start : start + 16384]

    streamed = HTTP.request(
        "POST", f"{strict.url}/pubapi/publish?cid=grp/big2", body=pieces(), chunked=True,
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert streamed.status == 413, streamed.data
    _nothing_happened(registry_env, strict)
    # The queue still works after all that.
    good = make_tarball({"fine.txt": b"fine\n"})
    assert text(post(strict, "/pubapi/publish?cid=grp/fine", good, token)) == "OK\n"
    wait_until(lambda: text(get(strict, "/pubapi/exists?cid=grp/fine")).startswith("PRESENT"),
               120, strict.logs)  # fmt: skip
    assert registry_env.read(FQRNS[0], "/sw/grp/fine/fine.txt") == b"fine\n"


def test_hard_links_move_with_the_stripping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A hard link names its leader by its path in the tarball: after ``striplevels`` the
    leader is found under its stripped name, and one stripped away is refused (400)."""
    from pathlib import Path

    from cvmfs_ml.registry.tarballs import RejectedError, check_tarball, tarball_items

    def build(tar: tarfile.TarFile) -> None:
        _member(tar, "top", type=tarfile.DIRTYPE)
        _member(tar, "top/a.bin", size=5)
        _member(tar, "top/b.bin", type=tarfile.LNKTYPE, linkname="top/a.bin")

    tarball = Path(tmp_path) / "t.tar"
    tarball.write_bytes(_tar(build))
    assert check_tarball(tarball, 1, max_members=10, max_unpacked_bytes=100) == (3, 5)
    links = {i.path: i.same_as for i in tarball_items(tarball, "/sw/g/c", 1) if i.same_as}
    assert links == {"/sw/g/c/b.bin": "/sw/g/c/a.bin"}

    def to_top(tar: tarfile.TarFile) -> None:
        _member(tar, "a.bin", size=5)
        _member(tar, "top", type=tarfile.DIRTYPE)
        _member(tar, "top/b.bin", type=tarfile.LNKTYPE, linkname="a.bin")

    tarball.write_bytes(_tar(to_top))
    with pytest.raises(RejectedError, match="stripped away") as refused:
        check_tarball(tarball, 1, max_members=10, max_unpacked_bytes=100)
    assert refused.value.status == 400


def test_catalog_markers_past_the_limit_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each .cvmfscatalog file of an upload makes a nested catalog: a tarball of a few kB made
    thousands, each a catalog object that the one publishing thread writes and clients fetch.
    A folder of that name is no marker; a tarball at the limit passes."""
    from pathlib import Path

    from cvmfs_ml.registry.tarballs import RejectedError, check_tarball

    def build(count: int):  # type: ignore[no-untyped-def]
        def members(tar: tarfile.TarFile) -> None:
            _member(tar, "top", type=tarfile.DIRTYPE)
            for i in range(count):
                _member(tar, f"top/m{i}", type=tarfile.DIRTYPE)
                _member(tar, f"top/m{i}/.cvmfscatalog", size=0)
            _member(tar, "top/dir", type=tarfile.DIRTYPE)
            _member(tar, "top/dir/.cvmfscatalog", type=tarfile.DIRTYPE)

        return _tar(members)

    tarball = Path(tmp_path) / "t.tar"
    tarball.write_bytes(build(3))
    limits = {"max_members": 100, "max_unpacked_bytes": 100}
    assert check_tarball(tarball, 1, **limits, max_catalogs=3) == (9, 0)
    with pytest.raises(RejectedError, match=r"more than 2 \.cvmfscatalog files") as refused:
        check_tarball(tarball, 1, **limits, max_catalogs=2)
    assert refused.value.status == 413
    tarball.write_bytes(build(1001))  # the registry's default
    with pytest.raises(RejectedError, match="more than 1000"):
        check_tarball(tarball, 1, max_members=10_000, max_unpacked_bytes=100)


def test_a_checked_cid_is_checked_whatever_the_case_of_its_digest(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """``grp/sha256:<HEX>`` in capitals (PowerShell's Get-FileHash prints them) was taken as a
    plain name, so any body was published under it unchecked; ``sha256:`` with a digest cut
    short was, too. The digest is compared whatever its case, and a short one is refused."""
    token = registry_env.tokens["writer"]
    body = make_tarball({"f": b"checked\n"})
    other = hashlib.sha256(b"something else").hexdigest().upper()
    wrong = post(registry, f"/pubapi/publish?cid=grp/sha256:{other}", body, token)
    assert wrong.status == 400 and "sha256" in text(wrong), text(wrong)
    short = post(registry, "/pubapi/publish?cid=grp/sha256:abc123", body, token)
    assert short.status == 400 and "64" in text(short), text(short)
    assert list((registry_env.data / "spool").glob("*")) == []
    right = hashlib.sha256(body).hexdigest().upper()
    assert text(post(registry, f"/pubapi/publish?cid=grp/sha256:{right}", body, token)) == "OK\n"
