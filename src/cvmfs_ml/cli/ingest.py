"""``cvmfs-ml model ingest URI --repo R --as NS/NAME:VERSION``: publish a model from elsewhere.

One command, dispatching on the URI:

* ``oci://HOST[:PORT]/REPO[:TAG][@DIGEST]`` (or ``docker://``): an ORAS artifact, a ModelPack or
  KitOps artifact, or a container image (:mod:`cvmfs_ml.models.sources.oci`);
* ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN/PATH``: an MLflow model resolved
  through the tracking server (:mod:`cvmfs_ml.models.sources.mlflow`);
* a local folder holding an ``MLmodel`` file: an MLflow model on disk.

Re-running the same ingest is a no-op (same manifest digest, same MLflow model id). Plain
folders and Hugging Face snapshots go through ``cvmfs-ml model publish``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cvmfs_ml.cli.common import (
    MAX_BYTES_HELP,
    MAX_UNPACKED_HELP,
    JsonOption,
    _fail,
    friendly,
    open_publisher,
    visible,
)
from cvmfs_ml.models.sources.limits import MAX_BYTES

__all__ = ["model_ingest", "source_kind"]


def source_kind(uri: str) -> str:
    """``"oci"``, ``"mlflow"`` or ``""`` (not something ``ingest`` takes)."""
    from cvmfs_ml.models.sources.mlflow import MLMODEL, is_mlflow_uri

    if uri.startswith(("oci://", "docker://")):
        return "oci"
    if is_mlflow_uri(uri) or (Path(uri) / MLMODEL).is_file():
        return "mlflow"
    return ""


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


@friendly
def model_ingest(
    uri: Annotated[
        str,
        typer.Argument(
            help="oci://HOST:PORT/REPO:TAG (or @sha256:...), models:/NAME/VERSION,"
            " models:/NAME@ALIAS, runs:/RUN/PATH, or an MLflow model folder"
        ),
    ],
    repo: Annotated[str, typer.Option("--repo", help="repository folder (holds .cvmfspublished)")],
    as_ref: Annotated[str, typer.Option("--as", help="NAMESPACE/NAME:VERSION")],
    keys: Annotated[
        Path | None, typer.Option("--keys", help="keys folder (default: ROOT/../keys)")
    ] = None,
    plain_http: Annotated[
        bool, typer.Option("--plain-http", help="OCI: talk HTTP, not HTTPS (loopback registries)")
    ] = False,
    platform: Annotated[
        str,
        typer.Option(
            "--platform", help="OCI: OS/ARCH or OS/ARCH/VARIANT to take from an image index"
        ),
    ] = "linux/amd64",
    subpath: Annotated[
        str, typer.Option("--path", help="OCI: publish only this folder (e.g. 'models')")
    ] = "",
    username: Annotated[
        str | None, typer.Option("--username", envvar="CVMFS_ML_OCI_USERNAME")
    ] = None,
    password: Annotated[
        str | None,
        typer.Option("--password", envvar="CVMFS_ML_OCI_PASSWORD", help="prefer the env variable"),
    ] = None,
    blob_cache: Annotated[
        Path | None, typer.Option("--blob-cache", help="OCI: keep verified blobs here")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")
    ] = None,
    registry_uri: Annotated[
        str | None, typer.Option("--registry-uri", envvar="MLFLOW_REGISTRY_URI")
    ] = None,
    description: Annotated[
        str | None, typer.Option("--description", "-m", help="default: from the source")
    ] = None,
    license_: Annotated[str | None, typer.Option("--license")] = None,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="also point this alias at it (repeat)")
    ] = None,
    no_latest: Annotated[bool, typer.Option("--no-latest", help="leave 'latest' alone")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="publish even if the same source is recorded")
    ] = False,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="OCI: " + MAX_BYTES_HELP)
    ] = MAX_BYTES,
    max_unpacked_bytes: Annotated[
        int | None, typer.Option("--max-unpacked-bytes", min=1, help="OCI: " + MAX_UNPACKED_HELP)
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a model from an OCI registry or MLflow (same source again: nothing to do)."""
    from cvmfs_ml.models.layout import ALIAS_LATEST, ModelRef

    try:
        ref = ModelRef.parse(as_ref, require_version=True)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    kind = source_kind(uri)
    if not kind:
        raise _fail(
            f"cannot ingest {uri!r}: expected oci://..., models:/..., runs:/... or an MLflow "
            "model folder (plain folders: cvmfs-ml model publish)"
        )
    aliases = ([] if no_latest else [ALIAS_LATEST]) + list(alias or [])
    publisher = open_publisher(repo, keys)
    common: dict[str, Any] = {
        "description": description,
        "license": license_,
        "aliases": aliases,
        "force": force,
    }
    try:
        if kind == "oci":
            from cvmfs_ml.models.sources.oci import ingest_oci

            result = ingest_oci(
                publisher, uri, ref, plain_http=plain_http, username=username, password=password,
                platform=platform, subpath=subpath, blob_dir=blob_cache, max_bytes=max_bytes,
                max_unpacked=max_unpacked_bytes, **common,
            )  # fmt: skip
        else:
            from cvmfs_ml.models.sources.mlflow import ingest_mlflow

            result = ingest_mlflow(
                publisher, uri, ref, tracking_uri=tracking_uri, registry_uri=registry_uri,
                **common,
            )  # fmt: skip
    except ValueError as exc:  # an invalid alias or subpath
        raise _fail(str(exc)) from exc
    revision = publisher.manifest().revision
    if as_json:
        typer.echo(json.dumps({**result.to_json(), "revision": revision}))
        return
    identity = result.source.get("manifest_digest") or result.source.get("model_uuid") or ""
    if result.skipped:  # the identity is the source's (an MLmodel's model_uuid): visible()
        typer.echo(visible(f"{ref} already holds {uri} ({identity}); nothing to do"))
        return
    record = result.record
    typer.echo(visible(
        f"revision {revision}: ingested {uri} ({identity}) as {ref} at {record.path} "
        f"({record.file_count} files, {_size(record.size)}, format {record.format or 'unknown'})"
    ))  # fmt: skip
