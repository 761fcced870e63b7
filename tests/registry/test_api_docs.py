"""``/docs`` is served from the service itself: no CDN, so the API page works offline."""

from __future__ import annotations

import re
from pathlib import Path

from ._helpers import RegistryEnv, RegistryServer, get, text
from .test_web import _chromium, _headless


def test_docs_page_references_only_local_assets(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path
) -> None:
    page = get(registry, "/docs")
    assert page.status == 200
    html = text(page)
    assert "SwaggerUIBundle" in html  # the interactive page, not the fallback
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+", html), "an outside URL in /docs"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 3  # script, stylesheet, icon
    for asset in assets:
        assert asset.startswith("/"), asset
        fetched = get(registry, asset)
        assert fetched.status == 200 and len(fetched.data) > 100, asset
    assert get(registry, "/redoc").status == 404  # ReDoc would load from a CDN
    # Headless Chromium renders the operations from /openapi.json (the machine has no way out,
    # so whatever rendered came from this service).
    dom = _headless(_chromium(), tmp_path, "--virtual-time-budget=20000", "--dump-dom",
                    f"{registry.url}/docs")  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "/pubapi/publish" in dom.stdout and "opblock" in dom.stdout
