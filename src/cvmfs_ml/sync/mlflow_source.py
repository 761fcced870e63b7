"""MLflow registered models in a sync round: versions become versions, aliases follow.

Each MLflow model version ``N`` is published as version ``N`` of the wishlist's
``NAMESPACE/NAME``, once (``model.json`` records the registered model, version and run id, so a
version already there is not downloaded again). Every MLflow alias (``champion``, ``prod``) is
pointed at the version it names in MLflow, and moves when it moves there; ``latest`` follows
the highest version number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError, CvmfsMlError, FormatError, NotFoundError
from cvmfs_ml.models.layout import ALIAS_LATEST, validate_component
from cvmfs_ml.models.sources.mlflow import pull_registered_version
from cvmfs_ml.sync.wishlist import ModelSpec

__all__ = ["plan_mlflow"]

MAX_VERSIONS = 1000


def _registry(spec: ModelSpec) -> tuple[list[Any], dict[str, str]]:
    """(model versions, ``{alias: version}``) of the registered model, from the server."""
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as exc:
        raise ConfigError(f"{spec.source} needs MLflow: pip install mlflow-skinny") from exc
    name = spec.registered_model or ""
    try:
        client = MlflowClient(tracking_uri=spec.tracking_uri, registry_uri=spec.tracking_uri)
        model = client.get_registered_model(name)
        escaped = name.replace("'", "\\'")
        versions = list(client.search_model_versions(f"name='{escaped}'", max_results=MAX_VERSIONS))
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise NotFoundError(name, spec.tracking_uri or "MLflow") from exc
        raise FormatError(spec.source, f"MLflow: {exc.message}") from exc
    aliases = {str(k): str(v) for k, v in (getattr(model, "aliases", None) or {}).items()}
    return versions, aliases


def _plan_version(work: Any, repo: Any, folder: Path, spec: ModelSpec, version: str) -> None:
    ref = spec.ref.with_version(version)
    source = work.published_source(repo, ref)
    if source is not None:
        if (source.get("registered_model"), source.get("model_version")) != (
            spec.registered_model,
            version,
        ):
            raise FormatError(str(ref), "published from another source than the wishlist's")
        work.log("skip_model", image=spec.source, model=str(ref), reason="unchanged")
        return
    folder.mkdir(parents=True)
    pulled = pull_registered_version(
        spec.registered_model or "", version, folder, tracking_uri=spec.tracking_uri
    )
    work.add_version(ref, folder, pulled, f"{spec.source}/{version}", [])


def plan_mlflow(work: Any, repo: Any, scratch: Path, spec: ModelSpec) -> None:
    """Plan the versions and aliases of ``spec`` into the round ``work`` (engine._Round)."""
    versions, aliases = _registry(spec)
    numbers = sorted(int(v.version) for v in versions)
    for model_version in sorted(versions, key=lambda v: int(v.version)):
        version = str(model_version.version)
        try:
            _plan_version(work, repo, scratch / f"v{version}", spec, version)
        except (CvmfsMlError, OSError, ValueError) as exc:  # the other versions still sync
            work.fail("sync_model", f"{spec.source}/{version}", exc, model=spec.ref.key)
    for alias, version in sorted(aliases.items()):
        try:
            validate_component(alias, "alias", version=True)
        except ValueError as exc:
            work.fail("alias_model", f"{spec.ref.key}/{alias}", exc)
            continue
        work.plan.aliases.append((spec.ref.with_version(version), alias))
    if numbers and ALIAS_LATEST not in aliases:
        work.plan.aliases.append((spec.ref.with_version(str(numbers[-1])), ALIAS_LATEST))
