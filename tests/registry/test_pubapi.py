"""The user-pub API on a real server: curl uploads, ``exists`` polling, reads through the client."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from ._helpers import (
    FQRNS,
    RegistryEnv,
    RegistryServer,
    get,
    job_json,
    make_tarball,
    post,
    sha256,
    text,
    wait_until,
)

pytestmark = pytest_mark = []


def curl_publish(
    server: RegistryServer, tarball: Path, cid: str, token: str, strip: int = 0
) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-X", "POST", "--data-binary", f"@{tarball}",
         "-H", f"Authorization: Bearer {token}",
         f"{server.url}/pubapi/publish?cid={cid}&striplevels={strip}"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return result.stdout


def test_curl_publish_then_exists_makes_files_readable(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path
) -> None:
    files = {"bin/run.sh": b"#!/bin/sh\necho hi\n", "data/weights.bin": bytes(range(256)) * 900}
    tarball = tmp_path / "t.tgz"
    tarball.write_bytes(make_tarball(files, top="myproject"))
    token = registry_env.tokens["writer"]
    assert text(get(registry, "/pubapi/exists?cid=grp/abc123", token)) == "MISSING\n"

    assert curl_publish(registry, tarball, "grp/abc123", token, strip=1) == "OK\n"
    answer = wait_until(
        lambda: (t := text(get(registry, "/pubapi/exists?cid=grp/abc123", token)))
        .startswith("PRESENT:") and t, 120, registry.logs,
    )  # fmt: skip
    assert answer == f"PRESENT:/cvmfs/{FQRNS[0]}/sw/grp/abc123\n"
    for name, data in files.items():
        assert registry_env.read(FQRNS[0], f"/sw/grp/abc123/{name}") == data
    assert registry_env.read(FQRNS[0], "/sw/grp/abc123/.publisher") == b"writer\n"
    publisher = registry_env.publisher()
    with __import__("cvmfs_ml.client.repository", fromlist=["Repository"]).Repository.open(
        publisher.repo_dir, public_key=publisher.keys.paths.master_public
    ) as repo:
        assert repo.stat("/sw/grp/abc123").is_nested_mountpoint  # a catalog per CID

    # Publishing it again answers PRESENT and makes no new revision; update answers PRESENT.
    revision = registry_env.revision()
    assert curl_publish(registry, tarball, "grp/abc123", token, strip=1) == answer
    before = json.loads(get(registry, "/api/v1/cids/grp/abc123", token).data)["last_used"]
    assert text(get(registry, "/pubapi/update?cid=grp/abc123", token)) == answer
    after = json.loads(get(registry, "/api/v1/cids/grp/abc123", token).data)
    assert after["last_used"] > before
    assert after["state"] == "published" and after["revision"] == revision
    assert registry_env.revision() == revision
    assert text(get(registry, "/pubapi/update?cid=grp/nothere", token)) == "MISSING\n"


def test_ping_config_and_unknown_api(registry: RegistryServer) -> None:
    ping = get(registry, "/pubapi/ping")
    assert (ping.status, text(ping)) == (200, "OK\n")
    assert ping.headers["Cache-control"] == "max-age=0"
    assert ping.headers["Content-Type"].startswith("text/plain")
    assert text(get(registry, "/pubapi/config")) == f"repos:{FQRNS[0]},{FQRNS[1]}\n"
    unknown = get(registry, "/pubapi/frobnicate")
    assert (unknown.status, text(unknown)) == (404, "Unrecognized api\n")


def test_structured_logs(registry_env: RegistryEnv) -> None:
    server = registry_env.start(extra=["--log-format", "json"])
    assert text(get(server, "/pubapi/ping")) == "OK\n"
    wait_until(lambda: "/pubapi/ping" in server.logs(), 60)
    lines = [line for line in server.logs().splitlines()[1:] if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any("/pubapi/ping" in e["message"] and e["logger"] == "uvicorn.access" for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_json_api_reports_job_states_and_checked_cid(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    body = make_tarball({"a.txt": b"checked content\n"})
    cid = f"grp/sha256:{sha256(body)}"
    token = registry_env.tokens["writer"]
    response = post(registry, f"/api/v1/cids/{cid}", body, token)
    assert response.status == 202, response.data
    job = json.loads(response.data)
    assert job["state"] in ("queued", "publishing", "published") and job["cid"] == cid
    done = wait_until(
        lambda: (j := job_json(registry, job["id"], token))["state"] == "published" and j,
        120, registry.logs,
    )  # fmt: skip
    assert done["revision"] >= 1 and done["path"] == f"/cvmfs/{FQRNS[0]}/sw/{cid}"
    visible = json.loads(get(registry, f"/api/v1/repositories/{FQRNS[0]}/revisions/"
                             f"{done['revision']}").data)  # fmt: skip
    assert visible["visible"] is True
    later = json.loads(get(registry, f"/api/v1/repositories/{FQRNS[0]}/revisions/"
                           f"{done['revision'] + 1}").data)  # fmt: skip
    assert later["visible"] is False
    assert registry_env.read(FQRNS[0], f"/sw/{cid}/a.txt") == b"checked content\n"

    # The wrong body for a checked CID: 400, nothing queued.
    wrong = f"grp/sha256:{'0' * 64}"
    response = post(registry, f"/api/v1/cids/{wrong}", body, token)
    assert response.status == 400 and "sha256" in json.loads(response.data)["error"]
    assert json.loads(get(registry, f"/api/v1/cids/{wrong}", token).data)["state"] == "missing"


def test_metrics_and_health(registry_env: RegistryEnv, registry: RegistryServer) -> None:
    body = make_tarball({"m.txt": b"metrics\n"})
    token = registry_env.tokens["writer"]
    assert text(post(registry, "/pubapi/publish?cid=grp/m1", body, token)) == "OK\n"
    wait_until(lambda: text(get(registry, "/pubapi/exists?cid=grp/m1")).startswith("PRESENT"),
               120, registry.logs)  # fmt: skip
    assert text(post(registry, "/pubapi/publish?cid=.bad", body, token)).startswith("Bad request")
    metrics = text(get(registry, "/metrics"))
    assert re.search(rf'cvmfs_registry_publishes_total{{repository="{FQRNS[0]}"}} 1\.0', metrics)
    assert f"cvmfs_registry_bytes_ingested_total {float(len(body))}" in metrics
    assert re.search(r'cvmfs_registry_time_to_visible_seconds_count{repository="pub1.test"} 1\.0',
                     metrics)  # fmt: skip
    assert 'cvmfs_registry_errors_total{kind="bad_cid"} 1.0' in metrics
    assert "cvmfs_registry_queue_length" in metrics
    health = json.loads(get(registry, "/healthz").data)
    assert health["status"] == "ok"
    assert health["repositories"][FQRNS[0]]["revision"] == registry_env.revision()
    assert all(r["worker_alive"] for r in health["repositories"].values())


def test_identical_concurrent_publishes_collapse_into_one_job(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    import sqlite3
    import threading

    body = make_tarball({"same.bin": bytes(range(256)) * 4000})
    token = registry_env.tokens["writer"]
    barrier = threading.Barrier(8)
    answers: list[tuple[int, dict]] = []

    def publish() -> None:
        barrier.wait(60)
        response = post(registry, "/api/v1/cids/grp/same", body, token)
        answers.append((response.status, json.loads(response.data)))

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 8 and {status for status, _ in answers} <= {200, 202}
    job_ids = {data["id"] for status, data in answers if status == 202}
    job_ids |= {data["job"]["id"] for status, data in answers if status == 200}
    assert len(job_ids) == 1  # every request got the one job (or its published result)
    wait_until(lambda: text(get(registry, "/pubapi/exists?cid=grp/same")).startswith("PRESENT"),
               120, registry.logs)  # fmt: skip
    with sqlite3.connect(registry_env.data / "queue.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE cid='grp/same'").fetchone()[0] == 1
    # a job is marked published, then its body removed from the spool
    wait_until(lambda: not list((registry_env.data / "spool").glob("*")), 60, "an empty spool")


def test_revision_visibility_at_the_local_stratum1(
    registry_env: RegistryEnv, tmp_path: Path
) -> None:
    server = registry_env.start(extra=["--stratum1", str(tmp_path / "stratum1")])
    token = registry_env.tokens["writer"]
    body = make_tarball({"s1.txt": b"replicated\n"})
    job = json.loads(post(server, "/api/v1/cids/grp/s1", body, token).data)
    done = wait_until(
        lambda: (j := job_json(server, job["id"], token))["state"] == "published" and j,
        120, server.logs,
    )  # fmt: skip
    url = f"/api/v1/repositories/{done['repository']}/revisions/{done['revision']}"
    answer = wait_until(
        lambda: (a := json.loads(get(server, url).data))["visible_at_stratum1"] and a,
        120, server.logs,
    )  # fmt: skip
    assert answer["visible"] is True and answer["stratum1_revision"] >= done["revision"]
    later = f"/api/v1/repositories/{done['repository']}/revisions/{done['revision'] + 1}"
    assert json.loads(get(server, later).data)["visible_at_stratum1"] is False
    assert get(server, "/api/v1/repositories/no.such.repo/revisions/1").status == 404
    metrics = text(get(server, "/metrics"))
    assert re.search(r"cvmfs_registry_time_to_stratum1_seconds_count\{[^}]*\} 1\.0", metrics)


def test_tarball_with_hard_links_publishes(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path
) -> None:
    """GNU tar stores a second name of a file as a hard link member (no data of its own); the
    upload check once read every regular member's data and failed on it (a server error)."""
    tree = tmp_path / "proj"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "libx.so.1").write_bytes(bytes(range(256)) * 40)
    (tree / "lib" / "libx.so").hardlink_to(tree / "lib" / "libx.so.1")
    tarball = tmp_path / "h.tgz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(tmp_path), "proj"], check=True)
    listing = subprocess.run(["tar", "-tvzf", str(tarball)], capture_output=True, text=True)
    assert " link to " in listing.stdout  # really a hard link member
    token = registry_env.tokens["writer"]
    assert curl_publish(registry, tarball, "grp/hard1", token, strip=1) == "OK\n"
    wait_until(
        lambda: text(get(registry, "/pubapi/exists?cid=grp/hard1", token)).startswith("PRESENT:"),
        120, registry.logs,
    )  # fmt: skip
    for name in ("lib/libx.so.1", "lib/libx.so"):
        assert registry_env.read(FQRNS[0], f"/sw/grp/hard1/{name}") == bytes(range(256)) * 40
