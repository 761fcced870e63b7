"""A Stratum 0 in S3: moto's standalone server on loopback, the publisher and CLI against it, and
our clients (HTTP fetcher, fsspec, FUSE) reading the bucket's plain HTTP URL back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import ConfigError, PublishError, StorageError
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.s3 import S3Store
from cvmfs_ml.storage.s3_config import S3Config, parse_s3_location
from cvmfs_ml.testing import MotoS3

pytestmark = pytest.mark.service

FQRN = "s3.test"
SETTINGS = PublishSettings(
    min_chunk_size=256 * 1024, avg_chunk_size=512 * 1024, max_chunk_size=1024 * 1024, workers=2
)
_buckets = itertools.count()


def _tree(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "model" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "model" / "weights.bin").write_bytes(rng.bytes(3 * 2**20 + 17))  # chunked
    (root / "model" / "config.json").write_text('{"layers": 3}\n' * 50)
    for i in range(20):
        (root / "model" / "sub" / f"f{i}.txt").write_text(f"{seed} {i}\n" * (i + 1))
    os.symlink("weights.bin", root / "model" / "latest")
    return root


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class S3Env:
    """One fresh bucket, its CVMFS_S3_* settings (a file too), a keys and a spool folder."""

    def __init__(self, moto: MotoS3, tmp: Path) -> None:
        self.bucket = f"cvmfs-ml-test-{os.getpid()}-{next(_buckets)}"
        moto.create_bucket(self.bucket)
        self.params = {**moto.s3_params(self.bucket), "CVMFS_SPOOL_DIR": str(tmp / "spool")}
        self.config_file = tmp / "s3.conf"
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in self.params.items()))
        self.keys = tmp / "keys"
        self.location = f"s3://{self.bucket}/stratum0/{FQRN}"
        self.url = f"{moto.url}/{self.bucket}/stratum0/{FQRN}"
        self.pub = self.keys / f"{FQRN}.pub"

    def create(self, **changes: object) -> Publisher:
        return create_repository(
            f"s3://{self.bucket}/stratum0",
            FQRN,
            keys_dir=self.keys,
            settings=SETTINGS.with_(**changes),
            s3_config=self.params,
        )

    def publish(self, publisher: Publisher, src: Path, at: str = "/") -> int:
        with publisher.transaction() as txn:
            txn.add_folder(src, at)
            return txn.commit().revision

    def keys_in_bucket(self) -> set[str]:
        store = S3Store(self.location, S3Config.from_params(self.params))
        return {rel for rel, _ in store.list_sizes()}


@pytest.fixture
def s3env(moto_s3: MotoS3, tmp_path: Path) -> S3Env:
    return S3Env(moto_s3, tmp_path)


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


# -- configuration --------------------------------------------------------------------------------
def test_locations_and_config_in_upstream_words() -> None:
    assert parse_s3_location("s3://bkt/a/b/models.cern.ch") == (
        "bkt",
        "a/b/models.cern.ch/",
        "models.cern.ch",
    )
    assert parse_s3_location("s3://bkt/models.cern.ch") == (
        "bkt",
        "models.cern.ch/",
        "models.cern.ch",
    )
    for bad in ("s3://bkt", "s3://B_ad/x", "s3://bkt/../x", "http://bkt/x"):
        with pytest.raises(ConfigError):
            parse_s3_location(bad)
    config = S3Config.from_params(
        {
            "CVMFS_S3_HOST": "s3.cern.ch",
            "CVMFS_S3_BUCKET": "bkt",
            "CVMFS_S3_DNS_BUCKETS": "true",
            "CVMFS_S3_USE_HTTPS": "yes",
            "CVMFS_S3_MAX_NUMBER_OF_PARALLEL_CONNECTIONS": "32",
        }
    )
    assert config.port == 443 and config.max_connections == 32
    assert config.public_url("bkt", "p/f.q/") == "https://bkt.s3.cern.ch:443/p/f.q"
    with pytest.raises(ConfigError, match="CVMFS_S3_HOST"):
        S3Config.from_params({})
    with pytest.raises(ConfigError, match="CVMFS_S3_PORT"):
        S3Config.from_params({"CVMFS_S3_HOST": "h", "CVMFS_S3_PORT": "http"})


def test_unreachable_endpoint_is_a_one_line_error(tmp_path: Path) -> None:
    from cvmfs_ml.testing import free_port

    config = tmp_path / "s3.conf"
    config.write_text(
        f"CVMFS_S3_HOST=127.0.0.1\nCVMFS_S3_PORT={free_port()}\nCVMFS_S3_DNS_BUCKETS=false\n"
        f"CVMFS_S3_MAX_RETRIES=1\nCVMFS_S3_TIMEOUT=2\nCVMFS_SPOOL_DIR={tmp_path / 'spool'}\n"
        "CVMFS_S3_ACCESS_KEY=a\nCVMFS_S3_SECRET_KEY=b\n"
    )
    started = time.monotonic()
    code, _out, err = _cli(
        "repo", "create", "s3://nobucket", "--fqrn", FQRN, "--keys", str(tmp_path / "k"),
        "--s3-config", str(config),
    )  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1 and "S3" in err
    assert time.monotonic() - started < 60  # retries are bounded


# -- the publisher and the CLI against moto -------------------------------------------------------
def test_create_publish_tag_rm_gc_check_through_the_cli(s3env: S3Env, tmp_path: Path) -> None:
    conf = ["--s3-config", str(s3env.config_file)]
    root = f"s3://{s3env.bucket}/stratum0"
    code, out, err = _cli(
        "repo",
        "create",
        root,
        "--fqrn",
        FQRN,
        "--keys",
        str(s3env.keys),
        "--chunks",
        "0.25/0.5/1",
        *conf,
    )
    assert code == 0, err
    assert s3env.location in out and s3env.url in out  # where clients read it
    code, _out, err = _cli(
        "repo", "create", root, "--fqrn", FQRN, "--keys", str(tmp_path / "k2"), *conf
    )
    assert code == 1 and "already holds a repository" in err

    src = _tree(tmp_path / "src")
    keys = ["--keys", str(s3env.keys), *conf]
    code, out, err = _cli(
        "repo", "publish", s3env.location, str(src), "--at", "/v1", "--json", *keys
    )
    assert code == 0, err
    assert '"revision": 1' in out
    code, out, err = _cli("repo", "tag", s3env.location, "first", *keys)
    assert code == 0 and "revision 1" in out, err
    # The same bytes again under another path: every object is found by a HEAD, none re-sent.
    code, out, err = _cli(
        "repo", "publish", s3env.location, str(src), "--at", "/v2", "--json", *keys
    )
    assert code == 0 and '"new_objects": 0' in out, out + err

    code, out, err = _cli("repo", "rm", s3env.location, "/v1", *keys)
    assert code == 0, err
    check = ["--key", str(s3env.pub), *conf]
    code, out, err = _cli("repo", "check", s3env.location, *check)
    assert code == 0 and out.startswith("ok"), out + err
    code, out, _ = _cli("repo", "ls", s3env.location, "/", *check)
    assert [line.split()[-1] for line in out.splitlines()] == ["v2"]

    # /v1 is gone from HEAD but tag 'first' holds it: gc keeps its data and says so.
    before = s3env.keys_in_bucket()
    code, out, err = _cli("repo", "gc", s3env.location, *keys)
    assert code == 0, err
    assert "first (r1)" in out
    # Nothing HEAD or a tag needs is gone (v2 shares v1's data objects).
    code, out, err = _cli("repo", "check", s3env.location, *check)
    assert code == 0, out + err
    code, _, err = _cli("repo", "tag", s3env.location, "-d", "first", *keys)
    assert code == 0, err
    code, out, err = _cli("repo", "rm", s3env.location, "/v2", *keys)
    assert code == 0, err
    code, out, err = _cli("repo", "gc", s3env.location, *keys)
    assert code == 0 and out.startswith("removed"), out + err
    after = s3env.keys_in_bucket()
    assert len(after) < len(before)  # the weights' chunks went once no tag held them
    code, out, err = _cli("repo", "tags", s3env.location, "--json", *check)
    assert code == 0 and '"first"' not in out
    code, out, err = _cli("repo", "check", s3env.location, *check)
    assert code == 0 and out.startswith("ok"), out + err


def test_clients_read_the_bucket_url_identically(s3env: S3Env, tmp_path: Path) -> None:
    publisher = s3env.create()
    src = _tree(tmp_path / "src", seed=3)
    s3env.publish(publisher, src)
    expected = _digests(src)

    with Repository.connect(s3env.url, public_key=s3env.pub) as repo:  # plain HTTP, no keys
        assert check_repository(repo).ok
        got = {}
        for entry in repo.walk("/"):
            if entry.is_regular:
                with repo.open_file(entry.path) as handle:
                    got[entry.path.lstrip("/")] = hashlib.sha256(handle.read()).hexdigest()
        assert got == expected
        assert repo.stat("/model/latest").symlink == "weights.bin"

    from cvmfs_ml.client.fsspec import CvmfsFileSystem

    fs = CvmfsFileSystem(url=s3env.url, public_key=str(s3env.pub), cache=str(tmp_path / "c"))
    for rel, digest in expected.items():
        assert hashlib.sha256(fs.cat_file(f"{FQRN}/{rel}")).hexdigest() == digest
    assert fs.info(f"{FQRN}/model/latest")["type"] in ("link", "file")


def test_large_objects_go_up_in_parallel_multipart(s3env: S3Env, tmp_path: Path) -> None:
    publisher = s3env.create(use_chunking=False)
    small = S3Config.from_params(s3env.params)
    small = type(small)(
        **{**small.__dict__, "multipart_threshold": 6 * 2**20, "multipart_chunk": 5 * 2**20}
    )
    publisher.store = S3Store(s3env.location, small)
    src = tmp_path / "src"
    src.mkdir()
    data = np.random.default_rng(7).bytes(13 * 2**20)
    (src / "blob.bin").write_bytes(data)
    s3env.publish(publisher, src)
    with Repository.connect(s3env.url, public_key=s3env.pub) as repo:
        entry = repo.stat("/blob.bin")
        assert not entry.is_chunked
        with repo.open_file("/blob.bin") as handle:
            assert handle.read() == data
    store = publisher.store
    assert isinstance(store, S3Store)
    rel = next(r for r, size in store.list_sizes() if size >= 13 * 2**20)
    head = store._call("head_object", Bucket=store.bucket, Key=store._key(rel))
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 3 MiB parts


def test_lost_race_fails_cleanly_and_loses_no_revision(s3env: S3Env, tmp_path: Path) -> None:
    """Two publishers whose spool locks never meet (two machines): S3's If-Match decides."""
    first = s3env.create()
    other_spool = {**s3env.params, "CVMFS_SPOOL_DIR": str(tmp_path / "spool2")}
    second = Publisher.open(s3env.location, s3env.keys, s3_config=other_spool)
    src_a = _tree(tmp_path / "a", seed=1)
    src_b = _tree(tmp_path / "b", seed=2)
    with first.transaction() as txn:
        txn.add_folder(src_a, "/a")
        assert s3env.publish(second, src_b, "/b") == 1  # lands while the first one runs
        with pytest.raises(PublishError, match="changed while this transaction ran"):
            txn.commit()
    with Repository.connect(s3env.url, public_key=s3env.pub) as repo:
        assert repo.manifest.revision == 1
        assert [e.name for e in repo.listdir("/")] == ["b"]
        assert check_repository(repo).ok
    assert s3env.publish(first, src_a, "/a") == 2  # and the loser simply tries again


# -- kill -9 during a publish ---------------------------------------------------------------------
PUBLISH = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from cvmfs_ml.publish.repository import Publisher

    location, keys, src, seed = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    params = json.loads(sys.argv[5])
    rng = np.random.default_rng(seed)
    (src / "nested").mkdir(parents=True, exist_ok=True)
    (src / "nested" / ".cvmfscatalog").write_bytes(b"")
    (src / "nested" / "weights.bin").write_bytes(rng.bytes(4 * 2**20))
    for i in range(100):
        (src / f"small-{i}.txt").write_text(f"{seed} {i}\\n" * 20)
    print("ready", flush=True)
    publisher = Publisher.open(location, keys, s3_config=params)
    with publisher.transaction() as txn:
        txn.add_folder(src, f"/run-{seed}")
        txn.commit()
    print("done", flush=True)
    """
)


def test_kill_9_during_an_s3_publish_keeps_the_old_revision(s3env: S3Env, tmp_path: Path) -> None:
    publisher = s3env.create()
    s3env.publish(publisher, _tree(tmp_path / "base"), "/base")
    revision = 1
    for seed, delay in enumerate((0.2, 0.6, 1.2, 2.0, 3.5), start=10):
        src = tmp_path / f"src{seed}"
        process = subprocess.Popen(
            [sys.executable, "-c", PUBLISH, s3env.location, str(s3env.keys), str(src), str(seed),
             json.dumps(s3env.params)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        with Repository.connect(s3env.url, public_key=s3env.pub) as repo:
            assert repo.manifest.revision in (revision, revision + 1)
            landed = repo.manifest.revision == revision + 1
            names = {e.name for e in repo.listdir("/")}
            assert (f"run-{seed}" in names) == landed
            assert "base" in names
            report = check_repository(repo)
            assert report.ok, report.problems
        revision += landed
    # The next publish recovers whatever was left and lands.
    assert (
        s3env.publish(
            Publisher.open(s3env.location, s3env.keys, s3_config=s3env.params),
            _tree(tmp_path / "last", 99),
            "/last",
        )
        == revision + 1
    )
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)


def test_s3_store_errors_are_ours(s3env: S3Env) -> None:
    store = S3Store(s3env.location, S3Config.from_params(s3env.params))
    assert not store.exists("data/00/none")
    with pytest.raises(FileNotFoundError):
        store.get_bytes(".cvmfspublished")
    wrong = {**s3env.params, "CVMFS_S3_BUCKET": "another-bucket"}
    with pytest.raises(ConfigError, match="differs"):
        S3Store(s3env.location, S3Config.from_params(wrong))
    no_bucket = {k: v for k, v in s3env.params.items() if k != "CVMFS_S3_BUCKET"}
    missing = S3Store(
        f"s3://no-such-bucket-{os.getpid()}/x/{FQRN}", S3Config.from_params(no_bucket)
    )
    with pytest.raises(StorageError):
        missing.create_skeleton()


def test_replica_syncs_from_the_bucket(s3env: S3Env, tmp_path: Path) -> None:
    from cvmfs_ml.replica.sync import sync_replica

    publisher = s3env.create()
    src = _tree(tmp_path / "src", seed=6)
    s3env.publish(publisher, src, "/m")
    dest = tmp_path / "stratum1" / FQRN
    report = sync_replica(s3env.location, dest, s3env.pub, s3_config=s3env.params)
    assert report.revision == 1 and report.objects_copied > 0
    with Repository.connect(dest, public_key=s3env.pub) as replica:
        assert check_repository(replica).ok
        with replica.open_file("/m/model/weights.bin") as handle:
            assert handle.read() == (src / "model" / "weights.bin").read_bytes()
    again = sync_replica(s3env.location, dest, s3env.pub, s3_config=s3env.params)
    assert again.up_to_date


def test_model_publish_to_s3_and_list_over_http(s3env: S3Env, tmp_path: Path) -> None:
    s3env.create()
    src = tmp_path / "m"
    src.mkdir()
    (src / "weights.bin").write_bytes(np.random.default_rng(8).bytes(2 * 2**20))
    (src / "config.json").write_text('{"hidden": 8}\n')
    conf = ["--keys", str(s3env.keys), "--s3-config", str(s3env.config_file)]
    publish = ["model", "publish", str(src), "--repo", s3env.location, "--json", *conf]
    code, out, err = _cli(*publish, "--as", "ns/m:1")
    assert code == 0, err
    assert json.loads(out)["published"]
    code, out, err = _cli(*publish, "--as", "ns/m:2")
    assert code == 0, err
    assert json.loads(out)["reused_bytes"] >= 2 * 2**20  # the weights were already there
    code, out, err = _cli("model", "ls", s3env.url, "--key", str(s3env.pub), "--json")
    assert code == 0, err
    assert {row["ref"] for row in json.loads(out)} == {"ns/m:1", "ns/m:2"}
    # The bucket itself, as docs/cli.md says any REPO may be: model ls/info/check took no
    # --s3-config ("No such option"), though model publish and repo ls/cat/check do.
    read = ["--key", str(s3env.pub), "--s3-config", str(s3env.config_file)]
    code, out, err = _cli("model", "ls", s3env.location, "--json", *read)
    assert code == 0, err
    assert {row["ref"] for row in json.loads(out)} == {"ns/m:1", "ns/m:2"}
    code, out, err = _cli("model", "info", s3env.location, "ns/m:2", "--json", *read)
    assert code == 0 and json.loads(out)["version"] == "2", err
    code, out, err = _cli("model", "check", s3env.location, *read)
    assert code == 0 and "ok" in out, err


def test_both_stores_implement_the_protocol(s3env: S3Env, tmp_path: Path) -> None:
    from cvmfs_ml.storage.base import ObjectStore
    from cvmfs_ml.storage.local import LocalStore

    assert isinstance(LocalStore(tmp_path), ObjectStore)
    assert isinstance(S3Store(s3env.location, S3Config.from_params(s3env.params)), ObjectStore)


def test_requests_survive_an_outage_with_retries_and_backoff(tmp_path: Path) -> None:
    """The S3 server goes away and comes back on the same port; a request in between waits."""
    import threading

    server = MotoS3(workdir=tmp_path / "moto")
    port = server.port
    try:
        server.create_bucket("outage")
        params = {
            **server.s3_params("outage"),
            "CVMFS_S3_MAX_RETRIES": "8",
            "CVMFS_S3_TIMEOUT": "5",
        }
        store = S3Store(f"s3://outage/x/{FQRN}", S3Config.from_params(params))
        store.put_bytes("data/00/before", b"x")
        server.stop()
        failed_once = threading.Event()

        def on_retry(caught_exception: Exception | None = None, **_: object) -> None:
            if caught_exception is not None:
                failed_once.set()

        store._client.meta.events.register("needs-retry.s3.HeadObject", on_retry)
        outcome: dict[str, object] = {}

        def peek() -> None:
            try:
                outcome["exists"] = store.exists("data/00/after")
            except Exception as exc:  # any failure is reported by the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=peek)
        thread.start()
        assert failed_once.wait(30), "the request never met the outage"
        server = MotoS3(port=port, workdir=tmp_path / "moto2")  # back, empty
        thread.join(120)
        assert not thread.is_alive()
        assert outcome == {"exists": False}, outcome  # answered by the restarted server
    finally:
        server.close()


def test_missing_settings_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("CVMFS_S3_")]:
        monkeypatch.delenv(name)
    code, _, err = _cli(
        "repo", "publish", f"s3://bkt/p/{FQRN}", str(tmp_path), "--keys", str(tmp_path)
    )
    assert code == 1 and "CVMFS_S3_HOST is not set" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("CVMFS_S3_HOST", "127.0.0.1")
    code, _, err = _cli("repo", "create", "s3://bkt/p", "--fqrn", FQRN)
    assert code == 1 and "pass --keys DIR" in err and len(err.strip().splitlines()) == 1


def test_replica_into_a_bucket_is_read_over_http(
    s3env: S3Env, moto_s3: MotoS3, tmp_path: Path
) -> None:
    """A Stratum 1 in S3: a local Stratum 0 replicated into a bucket, read from its URL."""
    from cvmfs_ml.publish.repository import create_repository as create_local
    from cvmfs_ml.replica.sync import sync_replica

    stratum0 = create_local(tmp_path / "srv", FQRN, settings=SETTINGS)
    src = _tree(tmp_path / "src", seed=9)
    with stratum0.transaction() as txn:
        txn.add_folder(src, "/m")
        txn.commit()
    pub = stratum0.keys.paths.master_public
    dest = f"s3://{s3env.bucket}/stratum1/{FQRN}"
    report = sync_replica(stratum0.repo_dir, dest, pub, s3_config=s3env.params)
    assert report.revision == 1 and report.objects_copied > 0
    url = f"{moto_s3.url}/{s3env.bucket}/stratum1/{FQRN}"
    with Repository.connect(url, public_key=pub) as replica:
        assert check_repository(replica).ok
        with replica.open_file("/m/model/weights.bin") as handle:
            assert handle.read() == (src / "model" / "weights.bin").read_bytes()
    assert sync_replica(stratum0.repo_dir, dest, pub, s3_config=s3env.params).up_to_date
