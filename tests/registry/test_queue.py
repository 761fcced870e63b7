"""The queue and the workers: batching, collapsing, restarts, kill -9, cleanup in two repos."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import object_path
from cvmfs_ml.registry.cid import ContentId
from cvmfs_ml.registry.config import ConfigFile
from cvmfs_ml.registry.service import Accepted, RegistryService

from ._helpers import (
    FQRNS,
    RegistryEnv,
    get,
    job_json,
    make_tarball,
    post,
    text,
    wait_until,
)


def _service(env: RegistryEnv) -> RegistryService:
    return RegistryService(env.repos, env.data, ConfigFile(env.config), poll_seconds=0.1)


def _accept(service: RegistryService, cid: str, body: bytes, strip: int = 0) -> Accepted:
    upload = service.new_upload()
    upload.write(body)
    return service.accept(ContentId.parse(cid), upload, strip, "test")


def _idle_loops(service: RegistryService, count: int) -> None:
    """Wait until every worker went ``count`` more times through its loop."""
    start = {name: w.loops for name, w in service.workers.items()}
    wait_until(lambda: all(w.loops >= start[n] + count for n, w in service.workers.items()), 60)


def _published(service: RegistryService, job_id: str) -> bool:
    job = service.job(job_id)
    assert job is not None and job.state != "failed", job
    return job.state == "published"


def test_waiting_jobs_become_one_revision_and_duplicates_collapse(
    registry_env: RegistryEnv,
) -> None:
    service = _service(registry_env)
    bodies = {
        f"grp/c{i}": make_tarball({f"f{i}.txt": f"content {i}\n".encode()}) for i in range(12)
    }
    jobs = {cid: _accept(service, cid, body).job for cid, body in bodies.items()}
    # The same CID again while queued: the active job comes back, no second job or upload.
    again = _accept(service, "grp/c0", bodies["grp/c0"])
    assert again.job is not None and jobs["grp/c0"] is not None
    assert again.job.id == jobs["grp/c0"].id
    assert len(list((registry_env.data / "spool").glob("*.upload"))) == 12
    repos = {job.repo for job in jobs.values() if job}
    assert repos == set(FQRNS)  # spread over both repositories, least busy first
    service.start()
    try:
        for job in jobs.values():
            assert job is not None
            wait_until(lambda j=job: _published(service, j.id), 120)
        revisions = {service.job(j.id).revision for j in jobs.values() if j}  # type: ignore[union-attr]
        # Each repository published its whole batch in one revision.
        assert revisions == {1}
        assert [registry_env.revision(f) for f in FQRNS] == [1, 1]
        for cid in bodies:
            record = service.store.find_cid(cid)
            assert record is not None
            i = cid.split("c")[-1]
            data = registry_env.read(record.repo, f"/sw/{cid}/f{i}.txt")
            assert data == f"content {i}\n".encode()
        # a job is marked published, then its body removed from the spool
        wait_until(lambda: not list((registry_env.data / "spool").glob("*.upload")), 60)
        # Published: a new publish of the same CID answers with its path, no job.
        present = _accept(service, "grp/c3", bodies["grp/c3"])
        assert present.job is None and present.present is not None
        assert present.present.endswith("/sw/grp/c3")
    finally:
        service.stop()


def test_work_queued_before_a_restart_completes_after_it(registry_env: RegistryEnv) -> None:
    service = _service(registry_env)  # accepts, but its workers never start
    ids = [_accept(service, f"grp/r{i}", make_tarball({"x": b"r%d" % i})).job for i in range(3)]
    service.stop()
    server = registry_env.start()
    for i, job in enumerate(ids):
        assert job is not None
        done = wait_until(
            lambda j=job: (d := job_json(server, j.id))["state"] == "published" and d,
            120, server.logs,
        )  # fmt: skip
        assert registry_env.read(done["repository"], f"/sw/grp/r{i}/x") == b"r%d" % i


def test_kill9_mid_publish_loses_nothing(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    token = registry_env.tokens["writer"]
    files = {f"d{i // 100}/f{i}": os.urandom(2048) for i in range(1500)}
    body = make_tarball(files)
    accepted = post(server, "/api/v1/cids/grp/big", body, token)
    assert accepted.status == 202, accepted.data
    job_id = json.loads(accepted.data)["id"]
    # Kill while the worker publishes when we can catch it (bounded); queued is fine too.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and job_json(server, job_id)["state"] == "queued":
        time.sleep(0.01)
    state = job_json(server, job_id)["state"]
    server.kill9()  # nothing may be lost, whatever the state
    assert state in ("queued", "publishing", "published")
    for fqrn in FQRNS:  # the repositories are intact and mountable
        publisher = registry_env.publisher(fqrn)
        with Repository.open(
            publisher.repo_dir, public_key=publisher.keys.paths.master_public
        ) as r:
            assert check_repository(r).ok
    restarted = registry_env.start()
    done = wait_until(
        lambda: (d := job_json(restarted, job_id))["state"] == "published" and d, 180,
        restarted.logs,
    )  # fmt: skip
    for name in ("d0/f0", "d7/f777", "d14/f1499"):
        assert registry_env.read(done["repository"], f"/sw/grp/big/{name}") == files[name]
    publisher = registry_env.publisher(done["repository"])
    with Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public) as r:
        report = check_repository(r)
        assert report.ok, report.problems
    wait_until(lambda: not list((registry_env.data / "spool").glob("*")), 60)  # then removed


def test_cleanup_removes_stale_cids_and_never_blocks_the_other_repository(
    registry_env: RegistryEnv,
) -> None:
    service = _service(registry_env)
    service.start()
    try:
        old_data, new_data = os.urandom(300_000), os.urandom(1000)
        for cid, data in (("grp/old", old_data), ("grp/new", new_data)):
            job = _accept(service, cid, make_tarball({"blob": data})).job
            assert job is not None
            wait_until(lambda j=job: _published(service, j.id), 120)
        first = FQRNS[0]
        assert {service.store.find_cid(c).repo for c in ("grp/old", "grp/new")} == {first}  # type: ignore[union-attr]
        publisher = registry_env.publisher(first)
        with Repository.open(
            publisher.repo_dir, public_key=publisher.keys.paths.master_public
        ) as r:
            layout = r.layout("/sw/grp/old/blob")
        old_objects = [
            publisher.store.path(object_path(piece.digest, layout.kind)) for piece in layout.pieces
        ]
        assert old_objects and all(p.exists() for p in old_objects)
        service.store.touch("grp/old", time.time() - 40 * 86400)  # unused for 40 days

        # Hold the first repository's lock: its cleanup waits, as a long one would.
        hold = publisher.lock()
        hold.__enter__()
        reports: list[object] = []
        cleaner = threading.Thread(target=lambda: reports.append(service.cleanup(first, 30)))
        try:
            cleaner.start()
            wait_until(lambda: service.workers[first].cleaning, 60)
            job = _accept(service, "grp/during", make_tarball({"d": b"during cleanup"})).job
            assert job is not None and job.repo == FQRNS[1]  # routed to the other repository
            wait_until(lambda: _published(service, job.id), 120)
            assert cleaner.is_alive()  # published while the cleanup was still waiting
            assert registry_env.read(FQRNS[1], "/sw/grp/during/d") == b"during cleanup"
        finally:
            hold.__exit__(None, None, None)
        cleaner.join(300)
        report = reports[0]
        assert report.removed == ["grp/old"]  # type: ignore[attr-defined]
        assert report.bytes_removed >= 300_000  # type: ignore[attr-defined]
        assert not any(p.exists() for p in old_objects)
        assert service.exists(ContentId("grp/old")) is None
        assert service.exists(ContentId("grp/new")) == f"/cvmfs/{first}/sw/grp/new"
        assert registry_env.read(first, "/sw/grp/new/blob") == new_data
        assert not service.workers[first].cleaning
    finally:
        service.stop()


def test_update_over_http_keeps_a_cid_from_cleanup(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    token, admin = registry_env.tokens["writer"], registry_env.tokens["admin"]
    assert (
        text(post(server, "/pubapi/publish?cid=grp/kept", make_tarball({"k": b"k"}), token))
        == "OK\n"
    )
    wait_until(lambda: text(get(server, "/pubapi/exists?cid=grp/kept")).startswith("PRESENT"),
               120, server.logs)  # fmt: skip
    assert text(get(server, "/pubapi/update?cid=grp/kept", token)).startswith("PRESENT:")
    # max_days=0.0001 (about 9 s): a CID used just now survives.
    report = json.loads(
        post(server, f"/api/v1/repositories/{FQRNS[0]}/cleanup?max_days=0.0001", b"", admin).data
    )
    assert report["removed"] == []
    assert text(get(server, "/pubapi/exists?cid=grp/kept")).startswith("PRESENT")
    # Zero days: everything unused since now goes, and the repository says so.
    report = json.loads(
        post(server, f"/api/v1/repositories/{FQRNS[0]}/cleanup?max_days=0", b"", admin).data
    )
    assert report["removed"] == ["grp/kept"]
    assert text(get(server, "/pubapi/exists?cid=grp/kept")) == "MISSING\n"
    publisher = registry_env.publisher(FQRNS[0])
    with Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public) as r:
        assert not r.exists("/sw/grp/kept")


def test_each_publish_is_snapshotted_into_a_local_stratum1(
    registry_env: RegistryEnv, tmp_path: Path
) -> None:
    stratum1 = tmp_path / "stratum1"
    service = RegistryService(
        registry_env.repos, registry_env.data, ConfigFile(registry_env.config),
        poll_seconds=0.1, stratum1=stratum1,
    )  # fmt: skip
    service.start()
    try:
        job = _accept(service, "grp/s1", make_tarball({"s.txt": b"on the stratum 1\n"})).job
        assert job is not None
        wait_until(lambda: _published(service, job.id), 120)
        published = service.job(job.id)
        assert published is not None and published.revision is not None
        wait_until(lambda: (service.stratum1_revision(job.repo) or -1) >= published.revision, 120)
        publisher = registry_env.publisher(job.repo)
        with Repository.open(
            stratum1 / job.repo, fqrn=job.repo, public_key=publisher.keys.paths.master_public
        ) as replica:
            assert replica.read_bytes("/sw/grp/s1/s.txt") == b"on the stratum 1\n"
        metrics = service.metrics.render().decode()
        assert f'cvmfs_registry_time_to_stratum1_seconds_count{{repository="{job.repo}"}} 1.0' in (
            metrics
        )
    finally:
        service.stop()


def test_daily_cleanup_runs_once_at_its_hour(registry_env: RegistryEnv) -> None:
    import datetime as dt

    registry_env.set_config(cleanup_hour=3)
    service = _service(registry_env)
    now = [dt.datetime(2026, 5, 4, 1, 0, tzinfo=dt.UTC)]  # before the 03:00 cleanup
    for worker in service.workers.values():
        worker.clock = lambda: now[0]
    service.start()
    try:
        job = _accept(service, "grp/daily", make_tarball({"d": b"d"})).job
        assert job is not None
        wait_until(lambda: _published(service, job.id), 120)
        service.store.touch("grp/daily", time.time() - 31 * 86400)
        revision = registry_env.revision(job.repo)
        _idle_loops(service, 3)  # several passes before the hour: nothing happens
        assert service.exists(ContentId("grp/daily")) is not None
        assert registry_env.revision(job.repo) == revision
        now[0] = dt.datetime(2026, 5, 4, 4, 30, tzinfo=dt.UTC)  # past 03:00 (+1 h for pub2)
        for worker in service.workers.values():
            worker.wake()
        wait_until(lambda: service.exists(ContentId("grp/daily")) is None, 120)
        wait_until(lambda: not any(w.cleaning for w in service.workers.values()), 120)
        after = registry_env.revision(job.repo)
        assert after == revision + 2  # the removal, then the settling revision
        _idle_loops(service, 3)  # the same day again: no second cleanup
        assert registry_env.revision(job.repo) == after
    finally:
        service.stop()


def test_a_job_that_cannot_be_published_fails_alone_with_its_reason(
    registry_env: RegistryEnv,
) -> None:
    service = _service(registry_env)
    lost = _accept(service, "grp/lost", make_tarball({"l": b"lost"})).job
    small = [_accept(service, f"grp/ok{i}", make_tarball({"s": b"%d" % i})).job for i in range(3)]
    assert lost is not None and all(small)
    Path(lost.upload).unlink()  # the spooled body is gone (a disk fault) before the worker runs
    service.start()
    try:
        failed = wait_until(lambda: (j := service.job(lost.id)).state == "failed" and j, 120)
        assert failed.reason and lost.upload in failed.reason
        for job in small:  # the batch was retried job by job: the others are published
            wait_until(lambda j=job: _published(service, j.id), 120)
        assert service.exists(ContentId("grp/lost")) is None
        wait_until(lambda: not list((registry_env.data / "spool").glob("*.upload")), 60)
        metrics = service.metrics.render().decode()
        assert 'cvmfs_registry_errors_total{kind="internal"} 1.0' in metrics
        # Publishing the CID again makes a new job that succeeds.
        again = _accept(service, "grp/lost", make_tarball({"l": b"lost"})).job
        assert again is not None and again.id != lost.id
        wait_until(lambda: _published(service, again.id), 120)
    finally:
        service.stop()
