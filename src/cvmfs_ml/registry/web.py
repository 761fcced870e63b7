"""The registry's web page: models, versions, aliases, files and their ``/cvmfs`` paths, with
copy-paste snippets, rendered on the server (no JavaScript), and the JSON list behind it.

Models are read from the first repository through the client (verified, as any reader sees
them); published CIDs come from the queue database.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.models.layout import ModelRecord
from cvmfs_ml.models.publish import list_models
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.registry.auth import require_reader
from cvmfs_ml.registry.service import RegistryService

__all__ = ["add_api_docs", "add_web_routes", "model_rows"]

MAX_LISTED = 500
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.5em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;width:100%} td,th{padding:.25em .5em;text-align:left;
vertical-align:top;border-bottom:1px solid #eee} code,pre{background:#f4f4f4;font-size:.9em}
pre{padding:.5em;overflow-x:auto} .tag{background:#e8f0fe;padding:0 .4em;border-radius:.3em}
form{margin:1em 0} input,select{padding:.2em}
"""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _full(repo: Repository, summary: ModelRecord) -> ModelRecord:
    """The version's ``model.json``, or its index summary (no files) where that does not read:
    one broken document must not empty the page of every other model."""
    try:
        return read_record(repo, summary.ref)
    except (CvmfsMlError, OSError):
        return summary


def model_rows(
    service: RegistryService, query: str = "", fmt: str = ""
) -> tuple[str, list[ModelRecord], int]:
    """The first repository's FQRN, its model versions matching ``query`` and ``fmt`` (at most
    :data:`MAX_LISTED`), and how many matched.

    The search runs on the index (one file) and only the versions shown have their
    ``model.json`` read: reading every version's, then keeping the first 500, made each view
    cost a read per published version and left versions past the 500th unfindable."""
    worker = service.workers[service.repositories[0]]
    publisher = worker.publisher
    cache = service.data_dir / "web-cache"
    query, fmt = query.strip().lower(), fmt.strip().lower()
    try:
        with Repository.open(
            publisher.repo_dir, fqrn=publisher.fqrn,
            public_key=publisher.keys.paths.master_public, cache=cache,
        ) as repo:  # fmt: skip
            matching = [
                r for r in list_models(repo)
                if (not query or query in r.ref.key.lower())
                and (not fmt or (r.format or "") == fmt)
            ]  # fmt: skip
            records = [_full(repo, r) for r in matching[:MAX_LISTED]]
    except (CvmfsMlError, OSError):  # no index yet: no models
        matching, records = [], []
    return publisher.fqrn, records, len(matching)


def _snippets(fqrn: str, record: ModelRecord) -> str:
    path = f"/cvmfs/{fqrn}{record.path}"
    first = record.files[0].path if record.files else "model.onnx"
    lines = [
        f"ls {path}",
        f"cvmfs-ml model get cvmfs://{fqrn}/{record.ref} ./model",
        f'fsspec.open("cvmfs://{fqrn}{record.path}/{first}", "rb")',
        f'storageUri: "cvmfs://{fqrn}{record.path}"   # KServe',
    ]
    if (record.format or "") == "onnx" or first.endswith(".onnx"):
        lines.append(f'onnxruntime.InferenceSession("{path}/{first}")')
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>"


def _page(service: RegistryService, fqrn: str, records: list[ModelRecord], matched: int,
          query: str, fmt: str) -> str:  # fmt: skip
    formats = sorted({r.format for r in records if r.format})
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>cvmfs-ml model registry</title>", f"<style>{_STYLE}</style></head><body>",
        f"<h1>Model registry: <code>/cvmfs/{html.escape(fqrn)}</code></h1>",
        '<form method=get action="/"><input name=q placeholder="search by name" value="'
        f'{html.escape(query)}"> <input name=format placeholder="format (onnx, gguf...)" value="'
        f'{html.escape(fmt)}"> <button>Search</button></form>',
        f"<p>{matched} model version(s)"
        + (f" (the first {len(records)} shown; search to narrow)" if matched > len(records) else "")
        + (f"; formats: {html.escape(', '.join(formats))}" if formats else "")
        + ' &middot; <a href="/docs">API</a> &middot; <a href="/api/v1/models">JSON</a></p>',
    ]  # fmt: skip
    for record in records:
        aliases = " ".join(f"<span class=tag>{html.escape(a)}</span>" for a in record.aliases)
        parts.append(
            f"<h2 id='{html.escape(str(record.ref))}'>{html.escape(record.ref.key)} "
            f"<small>{html.escape(record.version)}</small> {aliases}</h2>"
            f"<p>format <b>{html.escape(record.format or 'unknown')}</b>, "
            f"{_size(record.size)} in {record.file_count} file(s), published "
            f"{html.escape(record.created)} by {html.escape(record.published_by or '?')}<br>"
            f"path <code>/cvmfs/{html.escape(fqrn)}{html.escape(record.path)}</code></p>"
        )
        rows = "".join(
            f"<tr><td><code>{html.escape(f.path)}</code></td><td>{_size(f.size)}</td>"
            f"<td><code>{html.escape(f.sha256[:16])}…</code></td></tr>"
            for f in record.files[:50]
        )
        parts.append(f"<table><tr><th>file</th><th>size</th><th>sha256</th></tr>{rows}</table>")
        parts.append(_snippets(fqrn, record))
    cids = service.store.all_cids(50)
    if cids:
        parts.append("<h2>Recently used content IDs</h2><table><tr><th>CID</th><th>path</th>"
                     "<th>revision</th></tr>")  # fmt: skip
        for c in cids:
            path = html.escape(service.cid_path(c.repo, c.cid))
            parts.append(f"<tr><td>{html.escape(c.cid)}</td><td><code>{path}</code></td>"
                         f"<td>{c.revision}</td></tr>")  # fmt: skip
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def add_web_routes(app: FastAPI, service: RegistryService) -> None:
    def readable(request: Request) -> None:
        require_reader(service.config, request.headers.get("authorization"))

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, q: str = "", format: str = "") -> HTMLResponse:
        readable(request)
        fqrn, records, matched = model_rows(service, q, format)
        return HTMLResponse(_page(service, fqrn, records, matched, q, format))

    @app.get("/api/v1/models")
    def models(request: Request, q: str = "", format: str = "") -> list[dict[str, Any]]:
        readable(request)
        fqrn, records, _ = model_rows(service, q, format)
        return [{**r.info(), "cvmfs_path": f"/cvmfs/{fqrn}{r.path}"} for r in records]


SWAGGER_UI = "/static/swagger-ui"


def add_api_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI served from this service (the ``swagger-ui-bundle-v2`` package),
    not from a CDN, so the API page works where the service has no way out; without the
    package, a plain page pointing at ``/openapi.json``. ``app`` is made with ``docs_url=None``."""
    try:
        import swagger_ui_bundle
    except ImportError:
        swagger_ui_bundle = None

    if swagger_ui_bundle is not None:
        app.mount(SWAGGER_UI, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
                  name="swagger-ui")  # fmt: skip

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_bundle is None:
            return HTMLResponse(
                "<!doctype html><title>cvmfs-ml registry API</title><p>The OpenAPI document:"
                ' <a href="/openapi.json">/openapi.json</a> (install swagger-ui-bundle-v2 for'
                " the interactive page)</p>"
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # its default is an outside service
        )
