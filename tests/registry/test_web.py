"""The web page renders in headless Chromium with a published model's name and path."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model

from ._helpers import FQRNS, RegistryEnv, get, make_tarball, post, text, wait_until


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must provide it")
        pytest.skip("chromium is not installed")
    return binary


def _headless(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_page_lists_models_with_paths_and_snippets(
    registry_env: RegistryEnv, tmp_path: Path
) -> None:
    binary = _chromium()
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"\x00" * 4096)
    (source / "config.json").write_text('{"layers": 2}\n')
    publish_model(registry_env.publisher(), source, ModelRef("physics", "jet-tagger", "1.2"))
    server = registry_env.start()
    token = registry_env.tokens["writer"]
    assert (
        text(post(server, "/pubapi/publish?cid=grp/page", make_tarball({"a": b"a"}), token))
        == "OK\n"
    )
    wait_until(lambda: text(get(server, "/pubapi/exists?cid=grp/page")).startswith("PRESENT"),
               120, server.logs)  # fmt: skip

    dom = _headless(binary, tmp_path, "--dump-dom", f"{server.url}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "physics/jet-tagger" in page
    assert f"/cvmfs/{FQRNS[0]}/physics/jet-tagger/1.2" in page
    assert "weights.bin" in page and "storageUri" in page and "cvmfs-ml model get" in page
    assert f"/cvmfs/{FQRNS[0]}/sw/grp/page" in page  # the CID list
    shot = tmp_path / "page.png"
    result = _headless(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,900",
                       f"{server.url}/")  # fmt: skip
    assert result.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 5000  # a rendered page, not a blank image

    # Search by name and by format; the JSON API behind the page.
    assert "jet-tagger" not in text(get(server, "/?q=nomatch"))
    assert "jet-tagger" in text(get(server, "/?q=JET"))
    listed = json.loads(get(server, "/api/v1/models").data)
    assert [m["ref"] for m in listed] == ["physics/jet-tagger:1.2"]
    assert listed[0]["cvmfs_path"] == f"/cvmfs/{FQRNS[0]}/physics/jet-tagger/1.2"
    assert get(server, "/docs").status == 200  # the OpenAPI page


def test_page_searches_by_format_and_shows_aliases_and_snippets(
    registry_env: RegistryEnv, tmp_path: Path
) -> None:
    from models.formats.test_api import _onnx

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.bin").write_bytes(b"\x01" * 2048)
    publish_model(registry_env.publisher(), plain, ModelRef("physics", "jet-tagger", "1.2"))
    vision = tmp_path / "vision"
    vision.mkdir()
    _onnx(vision / "model.onnx")
    publish_model(registry_env.publisher(), vision, ModelRef("vision", "resnet", "2"),
                  aliases=("latest", "prod"))  # fmt: skip
    server = registry_env.start()
    page = text(get(server, "/?format=onnx"))
    assert "vision/resnet" in page and "jet-tagger" not in page
    assert "<span class=tag>prod</span>" in page and "<span class=tag>latest</span>" in page
    path = f"/cvmfs/{FQRNS[0]}/vision/resnet/2"
    assert f'onnxruntime.InferenceSession("{path}/model.onnx")' in html.unescape(page)
    assert f"ls {path}" in page and "storageUri" in page and "fsspec.open(" in page
    assert "format <b>onnx</b>" in page
    everything = text(get(server, "/"))
    assert "vision/resnet" in everything and "jet-tagger" in everything
    jet = everything.split("physics/jet-tagger", 1)[1].split("<h2", 1)[0]
    assert "ls /cvmfs/" in jet and "onnxruntime" not in jet  # no ONNX snippet for a .bin
    listed = json.loads(get(server, "/api/v1/models?format=onnx").data)
    assert [m["ref"] for m in listed] == ["vision/resnet:2"]
    assert sorted(listed[0]["aliases"]) == ["latest", "prod"]
    assert json.loads(get(server, "/api/v1/models?q=resnet&format=gguf").data) == []
    # Hostile search text comes back escaped, never as markup.
    assert "<script>" not in text(get(server, "/?q=%3Cscript%3Ealert(1)%3C/script%3E"))
