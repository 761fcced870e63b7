"""Models from MLflow: an ``MLmodel`` folder, or ``models:/NAME/VERSION`` from a tracking server.

An MLflow model is a folder with an ``MLmodel`` YAML file at its root (MLflow docs, "MLflow
Models" > "Storage Format"); every flavor's loader reads the folder relative to that file, so the
folder is published as it is and ``mlflow.pyfunc.load_model(<published folder>)`` works from
``/cvmfs``. What MLflow knows about the model - flavors, the signature (inputs, outputs, params),
``model_uuid``, ``run_id``, ``mlflow_version`` - goes into ``model.json``'s ``extra.mlflow``, with
the signature's JSON strings parsed into JSON, so a reader needs no MLflow to see the schema.

``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` are resolved with :class:`mlflow.MlflowClient`
against ``tracking_uri`` / ``registry_uri`` (MLflow's own defaults and ``MLFLOW_*`` variables when
not given); an alias is pinned to its version before download, so what is recorded is what was
fetched. ``runs:/...`` and other artifact URIs go straight to ``mlflow.artifacts``. Only those
URIs need the ``mlflow`` package (``mlflow-skinny`` is enough); a folder needs only PyYAML.

Re-ingesting the same MLflow model (same ``model_uuid``) into the same version writes nothing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import ConfigError, FormatError, NotFoundError, UnsafeInputError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.base import (
    IngestResult,
    PulledModel,
    published_record,
    same_source,
)
from cvmfs_ml.publish.repository import Publisher

__all__ = [
    "MLMODEL",
    "download_model",
    "ingest_mlflow",
    "is_mlflow_uri",
    "mlflow_metadata",
    "parse_models_uri",
    "pull_registered_version",
    "read_mlmodel",
]

MLMODEL = "MLmodel"
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?")
# MLmodel keys copied to extra.mlflow as they are (the rest is flavor-specific or bulky).
_MLMODEL_KEYS = (
    "artifact_path",
    "flavors",
    "mlflow_version",
    "model_uuid",
    "model_id",
    "run_id",
    "utc_time_created",
    "saved_input_example_info",
    "model_size_bytes",
    "databricks_runtime",
    "metadata",
)


def is_mlflow_uri(text: str) -> bool:
    """True for URIs MLflow resolves (``models:/``, ``runs:/``) rather than a local path."""
    return text.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (``name``, ``"3"``, None); ``models:/name@champion`` -> alias."""
    match = _MODELS_URI.fullmatch(uri.strip())
    if match is None:
        raise FormatError(uri, "expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return match.group("name"), match.group("version"), match.group("alias")


MAX_MLMODEL_BYTES = 1 << 20
"""An MLmodel file is a few kB of YAML; anything near this is not one."""
MAX_MLMODEL_VALUES = 1_000_000
"""Values an MLmodel may stand for once its aliases are expanded (a real one: hundreds)."""


def _expanded_size(node: Any, seen: dict[int, int | None]) -> int:
    """Nodes under ``node`` with aliases expanded, counted without expanding them (a node met
    again adds its count; a node inside itself, a recursive alias, is refused)."""
    import yaml

    if node is None:
        return 0
    key = id(node)
    if key in seen:
        known = seen[key]
        if known is None:
            raise yaml.YAMLError("recursive YAML aliases")
        return known
    seen[key] = None
    if isinstance(node, yaml.SequenceNode):
        count = 1 + sum(_expanded_size(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        count = 1 + sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    else:
        count = 1
    seen[key] = count
    return count


def read_mlmodel(folder: Path) -> dict[str, Any]:
    """The parsed ``MLmodel`` of ``folder`` (FormatError when missing or not a YAML mapping)."""
    path = Path(folder) / MLMODEL
    if not path.is_file():
        raise NotFoundError(str(path), "not an MLflow model folder")
    if Path(os.path.realpath(folder)) not in Path(os.path.realpath(path)).parents:
        # a link to a file of this machine (a key): never read, and never quoted in an error
        raise UnsafeInputError(str(path), "a link that leads outside the model folder")
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML comes with mlflow-skinny
        raise ConfigError("reading MLmodel needs PyYAML: pip install pyyaml") from exc
    size = path.stat().st_size
    if size > MAX_MLMODEL_BYTES:
        raise FormatError(str(path), f"{size} bytes, over the {MAX_MLMODEL_BYTES}-byte limit")
    try:
        text = path.read_text()
        # An alias repeats a node without copying it, so ten lines can stand for a billion
        # values once anything walks the tree (json.dumps below did, and hung the sync).
        # PyYAML writes aliases for objects that appear twice, so they are allowed, but the
        # tree they stand for is counted (each node once) before anything is built.
        values = _expanded_size(yaml.compose(text, yaml.SafeLoader), {})
        if values > MAX_MLMODEL_VALUES:
            raise FormatError(str(path), f"its YAML aliases stand for {values} values or more")
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:  # where, not the lines PyYAML quotes
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise FormatError(str(path), f"not YAML: {exc.problem or exc.context}{where}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FormatError(str(path), f"not YAML: {exc}") from exc
    except ValueError as exc:  # a value PyYAML cannot build: a 5000-digit int, a 13th month
        # (Python's own words for the first suggest raising an interpreter limit: not for us)
        reason = "a number of over 4300 digits" if "digits" in str(exc) else str(exc)
        raise FormatError(str(path), f"holds a value YAML cannot build: {reason}") from None
    except RecursionError:
        raise FormatError(str(path), "YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise FormatError(str(path), "MLmodel is not a mapping")
    return data


def _parse_schema(value: Any) -> Any:
    """Signature parts are JSON strings inside the YAML; keep them as JSON values."""
    if isinstance(value, str):
        try:
            return jsontext.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def mlflow_metadata(mlmodel: dict[str, Any]) -> dict[str, Any]:
    """What goes to ``extra.mlflow``: flavors, parsed signature, ids and versions."""
    out: dict[str, Any] = {k: mlmodel[k] for k in _MLMODEL_KEYS if mlmodel.get(k) is not None}
    signature = mlmodel.get("signature")
    if isinstance(signature, dict):
        out["signature"] = {
            part: _parse_schema(signature.get(part)) for part in ("inputs", "outputs", "params")
        }
    return json.loads(json.dumps(out, default=str))  # YAML dates and the like become strings


def _safe_uri(uri: str | None) -> str | None:
    """``uri`` without a password, fit for model.json."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None and "@" not in parts.netloc:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# MLflow retries a failed request 7 times with a doubling backoff, 120 s each: against a tracking
# server that is down, 4 minutes before a word. Bounded here unless the user set them.
_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def download_model(
    uri: str,
    dest: Path,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
) -> dict[str, Any]:
    """Download the MLflow model ``uri`` into the empty folder ``dest``; returns ``source``.

    ``models:/`` URIs are resolved through the registry first (alias -> version), then the
    pinned ``models:/NAME/VERSION`` is downloaded. MLflow's HTTP retries are bounded
    (``_HTTP_BOUNDS``) where the ``MLFLOW_HTTP_REQUEST_*`` variables are not set.
    """
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as exc:
        raise ConfigError(f"{uri} needs MLflow: pip install mlflow-skinny") from exc
    for name, value in _HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)  # read by MLflow at each request
    source: dict[str, Any] = {"type": "mlflow", "uri": uri}
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        source["tracking_uri"] = _safe_uri(client.tracking_uri)
        if uri.startswith("models:/"):
            name, version, alias = parse_models_uri(uri)
            if alias is not None:
                model_version = client.get_model_version_by_alias(name, alias)
                source["alias"] = alias
            else:
                model_version = client.get_model_version(name, str(version))
            source.update(
                {
                    "registered_model": model_version.name,
                    "model_version": str(model_version.version),
                    "run_id": model_version.run_id,
                    "artifact_source": _safe_uri(model_version.source),
                }
            )
            if getattr(model_version, "model_id", None):
                source["model_id"] = model_version.model_id
            uri = f"models:/{model_version.name}/{model_version.version}"
            # Where the registry says the version's files are: a models:/ URI would be
            # resolved against the process-wide registry URI, not the one given here.
            artifact_uri = client.get_model_version_download_uri(
                model_version.name, str(model_version.version)
            )
        else:
            artifact_uri = uri
        mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(dest), tracking_uri=tracking_uri
        )
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise NotFoundError(uri, source.get("tracking_uri") or "MLflow") from exc
        raise FormatError(uri, f"MLflow: {exc.message}") from exc
    return source


def _model_root(folder: Path) -> Path:
    """The folder holding ``MLmodel`` (artifact downloads may add one level)."""
    if (folder / MLMODEL).is_file():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir() and (p / MLMODEL).is_file()]
    if len(children) == 1:
        return children[0]
    raise NotFoundError(str(folder / MLMODEL), "the download holds no MLflow model")


def describe_folder(folder: Path, source: dict[str, Any]) -> PulledModel:
    """A :class:`PulledModel` for an MLflow model folder: ``extra.mlflow`` from its MLmodel."""
    mlmodel = read_mlmodel(folder)
    metadata = mlflow_metadata(mlmodel)
    source = dict(source)
    if metadata.get("model_uuid"):
        source["model_uuid"] = metadata["model_uuid"]
    if metadata.get("run_id") and not source.get("run_id"):
        source["run_id"] = metadata["run_id"]
    listed = metadata.get("flavors")
    flavors = sorted(map(str, listed)) if isinstance(listed, dict) else []
    description = f"MLflow model ({', '.join(flavors)})" if flavors else "MLflow model"
    return PulledModel(folder, source, description, None, {"mlflow": metadata})


def pull_registered_version(
    name: str, version: str, dest: Path, *, tracking_uri: str | None = None
) -> PulledModel:
    """Download registered model ``name`` version ``version`` into the empty folder ``dest``."""
    source = download_model(f"models:/{name}/{version}", dest, tracking_uri=tracking_uri)
    return describe_folder(_model_root(dest), source)


def ingest_mlflow(
    publisher: Publisher,
    uri: str | Path,
    ref: ModelRef,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    description: str | None = None,
    license: str | None = None,
    aliases: Sequence[str] = ("latest",),
    publisher_name: str | None = None,
    force: bool = False,
) -> IngestResult:
    """Publish an MLflow model (a folder, or a ``models:/``/``runs:/`` URI) as version ``ref``.

    Skips (``skipped=True``, nothing written) when ``ref`` already holds the same
    ``model_uuid``; ``force`` re-publishes (refused by :func:`publish_model` if it exists).
    """
    from cvmfs_ml.models.publish import publish_model

    ref.require_version()
    text = str(uri)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cvmfs-ml-mlflow.") as scratch:
        start = time.perf_counter()
        if is_mlflow_uri(text):
            folder = Path(scratch) / "model"
            folder.mkdir()
            source = download_model(
                text, folder, tracking_uri=tracking_uri, registry_uri=registry_uri
            )
            folder = _model_root(folder)
        else:
            folder = Path(text).resolve()
            source = {"type": "mlflow", "uri": str(folder)}
        pulled = describe_folder(folder, source)
        seconds["fetch"] = time.perf_counter() - start
        existing = published_record(publisher, ref)
        identity = {"type": "mlflow", "model_uuid": pulled.source.get("model_uuid")}
        if not force and same_source(existing, identity):
            assert existing is not None
            return IngestResult(ref, existing, existing.source, skipped=True, seconds=seconds)
        start = time.perf_counter()
        record = publish_model(
            publisher,
            pulled.folder,
            ref,
            source=pulled.source,
            description=description if description is not None else pulled.description,
            license=license,
            extra=pulled.extra,
            aliases=aliases,
            publisher_name=publisher_name,
        )
        seconds["publish"] = time.perf_counter() - start
    return IngestResult(ref, record, pulled.source, skipped=False, seconds=seconds)
