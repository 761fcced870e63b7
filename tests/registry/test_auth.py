"""Bearer tokens with scopes: no token, wrong scope, revoked token -> 401/403, no state change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from cvmfs_ml.cli import app
from cvmfs_ml.registry.config import add_token, load_config, revoke_token

from ._helpers import (
    FQRNS,
    HTTP,
    RegistryEnv,
    RegistryServer,
    get,
    make_tarball,
    post,
    text,
    wait_until,
)


def _unchanged(env: RegistryEnv, server: RegistryServer, cid: str) -> None:
    assert [env.revision(f) for f in FQRNS] == [0, 0]
    assert list((env.data / "spool").glob("*")) == []
    status = json.loads(get(server, f"/api/v1/cids/{cid}", env.tokens["admin"]).data)
    assert status["state"] == "missing" and status["job"] is None


def test_tokens_and_scopes(registry_env: RegistryEnv, registry: RegistryServer) -> None:
    body = make_tarball({"f.txt": b"secret-free\n"})
    tokens = registry_env.tokens
    url = "/pubapi/publish?cid=grp/one"

    anonymous = post(registry, url, body)
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"].startswith('Bearer realm="')
    assert text(anonymous).startswith("Access denied")
    bogus = post(registry, url, body, "cvr_not-a-real-token")
    assert bogus.status == 401
    malformed = HTTP.request("POST", registry.url + url, body=body,
                             headers={"Authorization": "Token abc"})  # fmt: skip
    assert malformed.status == 401
    for name in ("reader", "other"):  # read-only, or publish in another namespace
        assert post(registry, url, body, tokens[name]).status == 403, name
    # Ungrouped CIDs need a '*' scope; update (it extends a CID's life) needs publish.
    assert post(registry, "/pubapi/publish?cid=loose", body, tokens["writer"]).status == 403
    assert get(registry, "/pubapi/update?cid=grp/one", tokens["reader"]).status == 403
    assert get(registry, "/pubapi/update?cid=grp/one").status == 401
    # The JSON API and admin operations check the same way.
    assert post(registry, "/api/v1/cids/grp/one", body, tokens["reader"]).status == 403
    cleanup = f"/api/v1/repositories/{FQRNS[0]}/cleanup"
    assert post(registry, cleanup, b"", tokens["writer"]).status == 403
    assert post(registry, cleanup, b"").status == 401
    _unchanged(registry_env, registry, "grp/one")

    # Reading anonymously is allowed by default (anonymous_read).
    assert text(get(registry, "/pubapi/exists?cid=grp/one")) == "MISSING\n"
    # Revoking takes effect at the next request, without a restart.
    revoke_token(registry_env.config, "writer")
    assert post(registry, url, body, tokens["writer"]).status == 401
    _unchanged(registry_env, registry, "grp/one")
    # A token that may: accepted.
    assert text(post(registry, url, body, tokens["all"])) == "OK\n"
    wait_until(lambda: text(get(registry, "/pubapi/exists?cid=grp/one")).startswith("PRESENT"),
               120, registry.logs)  # fmt: skip
    # Tokens never reach the log.
    logs = registry.logs()
    assert "/pubapi/publish?cid=grp/one" in logs  # the access log is there...
    for token in tokens.values():
        assert token not in logs  # ...without any token


def test_anonymous_read_can_be_turned_off(registry_env: RegistryEnv) -> None:
    registry_env.set_config(anonymous_read=False)
    server = registry_env.start()
    closed = get(server, "/pubapi/exists?cid=grp/x")
    assert closed.status == 401
    assert text(get(server, "/pubapi/exists?cid=grp/x", registry_env.tokens["reader"])) == (
        "MISSING\n"
    )
    assert get(server, "/pubapi/exists?cid=other/x", registry_env.tokens["reader"]).status == 403
    assert text(get(server, "/pubapi/ping")) == "OK\n"  # ping and config stay open
    for path in ("/", "/api/v1/models", "/api/v1/repositories",
                 f"/api/v1/repositories/{FQRNS[0]}/revisions/1"):  # fmt: skip
        assert get(server, path).status == 401, path
        assert get(server, path, registry_env.tokens["reader"]).status == 200, path


def test_uploads_are_rate_limited_per_token(registry_env: RegistryEnv) -> None:
    registry_env.set_config(uploads_per_minute=2)
    server = registry_env.start()
    body = make_tarball({"r": b"r"})
    writer, other = registry_env.tokens["writer"], registry_env.tokens["all"]
    for i in range(2):
        assert text(post(server, f"/pubapi/publish?cid=grp/rate{i}", body, writer)) == "OK\n"
    limited = post(server, "/pubapi/publish?cid=grp/rate2", body, writer)
    assert limited.status == 429 and limited.headers["Retry-After"] == "60"
    assert text(post(server, "/pubapi/publish?cid=grp/rate3", body, other)) == "OK\n"  # per token
    assert 'cvmfs_registry_errors_total{kind="rate_limited"} 1.0' in text(get(server, "/metrics"))


def test_token_cli_shows_the_token_once_and_stores_a_hash(tmp_path: Path) -> None:
    config = tmp_path / "r.json"
    runner = CliRunner()
    result = runner.invoke(
        app, ["registry", "token", "add", "ci", "--scope", "publish:grp", "--scope", "read:*",
              "--config", str(config)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("cvr_") and len(token) > 40
    stored = config.read_text()
    assert token not in stored
    record = load_config(config).tokens["ci"]
    assert record.scopes == ("publish:grp", "read:*")
    assert load_config(config).authenticate(token) is not None
    assert (config.stat().st_mode & 0o777) == 0o600
    listed = runner.invoke(app, ["registry", "token", "list", "--config", str(config)])
    assert "ci\tactive\tpublish:grp read:*" in listed.stdout and token not in listed.stdout
    # A bad scope or a duplicate name: one line on stderr, exit 1.
    for args in (["ci2", "--scope", "write:grp"], ["ci", "--scope", "admin"]):
        bad = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml.cli", "registry", "token", "add", *args,
             "--config", str(config)], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bad.returncode == 1 and bad.stderr.startswith("cvmfs-ml: "), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    revoked = runner.invoke(app, ["registry", "token", "revoke", "ci", "--config", str(config)])
    assert revoked.exit_code == 0
    assert load_config(config).authenticate(token) is None


def test_a_broken_edit_of_the_config_keeps_the_service_on_the_last_good_one(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """A config file that does not parse for a moment (an editor half-way, a typo) answered
    every request 500 with a traceback and killed both publishing threads for good: CIDs
    queued after it were never published, even once the file was fixed."""
    good = registry_env.config.read_text()
    registry_env.config.write_text('{"anonymous_read": tru')
    assert get(registry, "/pubapi/exists?cid=grp/x", registry_env.tokens["writer"]).status == 200
    wait_until(lambda: "last good configuration" in registry.logs(), 30, registry.logs)
    # the workers read it too (each poll); they keep publishing with the last good one
    body = make_tarball({"f.txt": b"during a broken edit\n"})
    queued = post(registry, "/pubapi/publish?cid=grp/edit", body, registry_env.tokens["writer"])
    assert queued.status == 200, queued.data
    wait_until(lambda: text(get(registry, "/pubapi/exists?cid=grp/edit")).startswith("PRESENT"),
               60, registry.logs)  # fmt: skip
    health = json.loads(get(registry, "/healthz").data)
    assert all(r["worker_alive"] for r in health["repositories"].values()), health
    registry_env.config.write_text(good)  # fixed: a token revoked in it takes effect
    revoke_token(registry_env.config, "writer")
    wait_until(lambda: get(registry, "/pubapi/exists?cid=grp/x", registry_env.tokens["writer"])
               .status == 401, 30, registry.logs)  # fmt: skip
    assert "Traceback" not in registry.logs()
    assert (
        registry.logs().count("last good configuration") == 1
    )  # once per edit, not once per request


def _add_at_once(config: Path, name: str, barrier: Any) -> None:
    barrier.wait(60)
    add_token(config, name, ["admin"])


def test_tokens_added_at_the_same_time_are_all_kept(tmp_path: Path) -> None:
    """Two ``registry token add`` at once (provisioning scripts) each read the file, added
    their token and wrote it back: one token was printed to its user and never stored."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    config, names = tmp_path / "registry.json", [f"ci{i}" for i in range(12)]
    barrier = context.Barrier(len(names))
    workers = [context.Process(target=_add_at_once, args=(config, name, barrier))
               for name in names]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * len(names)
    assert sorted(load_config(config).tokens) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "registry.json") in (
        [], [".registry.json.lock"])  # fmt: skip


def test_a_config_file_removed_under_the_service_keeps_its_settings(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """The file removed while the service runs (a wrong ``rm``, a clean-up script) made it
    fall back to the defaults at the next request: every token unknown, and anonymous reads
    open again where ``anonymous_read`` was false."""
    registry_env.set_config(anonymous_read=False)
    wait_until(lambda: get(registry, "/pubapi/exists?cid=grp/x").status == 401, 30,
               registry.logs)  # fmt: skip
    saved = registry_env.config.read_text()
    registry_env.config.unlink()
    assert get(registry, "/pubapi/exists?cid=grp/x").status == 401
    assert get(registry, "/pubapi/exists?cid=grp/x", registry_env.tokens["writer"]).status == 200
    wait_until(lambda: "is gone" in registry.logs(), 30, registry.logs)
    registry_env.config.write_text(saved)
    revoke_token(registry_env.config, "writer")  # back: read again, as any change
    wait_until(lambda: get(registry, "/pubapi/exists?cid=grp/x", registry_env.tokens["writer"])
               .status == 401, 30, registry.logs)  # fmt: skip
