"""Issue 8, item 10: ``serve`` publishes what upstream's servers publish for monitors."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

from cvmfs_ml.publish.gc import collect_garbage
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.replica.sync import sync_replica
from cvmfs_ml.storage.http import RepositoryServer

DATE_UTC = re.compile(r"^[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2} UTC \d{4}$")


def get(server: RepositoryServer, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_repositories_and_meta_json(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    first = create_repository(srv, "a.test", keys_dir=tmp_path / "keys")
    create_repository(srv, "b.test", keys_dir=tmp_path / "keys")
    (srv / "b.test").rename(srv / "b")  # served under an alias folder
    sync_replica(first.repo_dir, srv / "replica.a", tmp_path / "keys" / "a.test.pub", "a.test")
    (srv / "not-a-repo").mkdir()
    with RepositoryServer(srv) as server:
        status, headers, body = get(server, "/cvmfs/info/v1/repositories.json")
        assert status == 200 and headers["Content-Type"] == "application/json"
        document = json.loads(body)
        assert document["schema"] == 1
        assert {"cvmfs_version", "os_id", "os_version_id", "os_pretty_name"} <= document.keys()
        assert document["repositories"] == [
            {"name": "a.test", "url": "/cvmfs/a.test"},
            {"name": "b.test", "alias": "b", "url": "/cvmfs/b"},
        ]
        assert document["replicas"] == [
            {"name": "a.test", "alias": "replica.a", "url": "/cvmfs/replica.a"}
        ]
        status, _, body = get(server, "/cvmfs/info/v1/meta.json")
        assert status == 200
        assert {"administrator", "email", "organisation", "custom"} <= json.loads(body).keys()
        # The administrator's own file wins (cvmfs_server update-info keeps it there).
        (srv / "info" / "v1").mkdir(parents=True)
        own = {"administrator": "Ops", "email": "ops@example.org", "organisation": "X"}
        (srv / "info" / "v1" / "meta.json").write_text(json.dumps(own))
        assert json.loads(get(server, "/cvmfs/info/v1/meta.json")[2]) == own
        (srv / "info" / "v1" / "meta.json").write_text("{not json")
        assert "administrator" in json.loads(get(server, "/cvmfs/info/v1/meta.json")[2])
        assert get(server, "/cvmfs/info/v1/other.json")[0] == 404


def test_gc_records_last_gc_in_the_status_file(tmp_path: Path) -> None:
    publisher = create_repository(tmp_path / "srv", "gc.test")
    status_file = publisher.repo_dir / ".cvmfs_status.json"
    status_file.write_text(json.dumps({"last_snapshot": "kept as it was"}))
    collect_garbage(publisher, dry_run=True)
    assert "last_gc" not in json.loads(status_file.read_text())
    collect_garbage(publisher)
    status = json.loads(status_file.read_text())
    assert DATE_UTC.match(status["last_gc"]), status
    assert status["last_snapshot"] == "kept as it was"
    with RepositoryServer(tmp_path / "srv") as server:
        code, _, body = get(server, "/cvmfs/gc.test/.cvmfs_status.json")
        assert code == 200 and json.loads(body) == status


def test_one_date_format_for_gc_and_snapshots() -> None:
    # gc (last_gc) and the replica (last_snapshot, .cvmfs_last_snapshot) share date_utc; the
    # replica passes naive UTC times, which must not be shifted by the local time zone.
    import datetime as dt

    from cvmfs_ml.storage.info import date_utc, updated_status

    aware = dt.datetime(2026, 11, 22, 1, 31, 3, tzinfo=dt.UTC)
    assert date_utc(aware) == "Sun Nov 22 01:31:03 UTC 2026"
    assert date_utc(aware.replace(tzinfo=None)) == date_utc(aware)
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert date_utc(aware.astimezone(plus_two)) == date_utc(aware)
    assert DATE_UTC.match(date_utc())
    kept = json.loads(updated_status(b'{"last_gc": "x", "other": 1}', last_snapshot="y"))
    assert kept == {"last_gc": "x", "other": 1, "last_snapshot": "y"}
    assert json.loads(updated_status(b"not json", last_snapshot="y")) == {"last_snapshot": "y"}
