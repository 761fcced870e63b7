"""``deploy/kserve/`` validated without a cluster.

Core kinds (StorageClass, PersistentVolumeClaim) go through ``kubernetes-validate`` (the
Kubernetes OpenAPI schemas, strict: unknown fields are errors). KServe's custom resources have
no schema there, so they are checked against the KServe SDK's generated models (every field
name and type, recursively, as the CRDs define them), and every container and volume in them is
also validated by ``kubernetes-validate`` inside a Pod.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes_validate
import pytest
import yaml
from kserve import models as kserve_models

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kserve"
K8S_VERSION = "1.33.0"
KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterStorageContainer"): "V1alpha1ClusterStorageContainer",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def _model_class(name: str) -> Any:
    return getattr(kserve_models, name, None) or getattr(kubernetes.client, name)


def check_against_model(data: Any, type_name: str, where: str) -> list[str]:
    """Field names and types of ``data`` against an OpenAPI-generated model class."""
    if type_name in ("object", "ResourceQuantity") or type_name.startswith("Union"):
        return []
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{where}: expected a list"]
        return [
            e
            for i, item in enumerate(data)
            for e in check_against_model(item, match[1], f"{where}[{i}]")
        ]
    if match := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name):
        if not isinstance(data, dict):
            return [f"{where}: expected a mapping"]
        value_type = match[1] or match[2]
        return [
            e for k, v in data.items() for e in check_against_model(v, value_type, f"{where}.{k}")
        ]
    scalars = {"str": (str, int, float), "int": (int,), "bool": (bool,), "float": (int, float)}
    if type_name in scalars:
        ok = isinstance(data, scalars[type_name]) or (type_name == "str" and data is None)
        return [] if ok else [f"{where}: expected {type_name}, got {data!r}"]
    cls = _model_class(type_name)
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} mapping"]
    by_json = {json: attr for attr, json in cls.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json:
            errors.append(f"{where}.{key}: unknown field of {type_name}")
            continue
        errors += check_against_model(value, cls.openapi_types[by_json[key]], f"{where}.{key}")
    return errors


def _pod(containers: list[dict[str, Any]], volumes: list[dict[str, Any]] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers}
    if volumes:
        spec["volumes"] = list(volumes)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def test_every_file_parses_and_has_the_expected_objects() -> None:
    kinds = sorted(name.split(":")[1].split("/")[0] for name, _ in documents())
    assert kinds == ["ClusterStorageContainer", "InferenceService", "InferenceService",
                     "InferenceService", "PersistentVolumeClaim", "StorageClass"]  # fmt: skip
    assert (DEPLOY / "Containerfile").is_file()
    containerfile = (DEPLOY / "Containerfile").read_text()
    assert 'ENTRYPOINT ["cvmfs-ml", "kserve-init"]' in containerfile


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key not in KSERVE_KINDS:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    assert check_against_model(doc, KSERVE_KINDS[key], doc["kind"]) == []
    if doc["kind"] == "ClusterStorageContainer":
        container = doc["spec"]["container"]
        kubernetes_validate.validate(_pod([container]), K8S_VERSION, strict=True)
        assert {"prefix": "cvmfs://"} in doc["spec"]["supportedUriFormats"]
        return
    predictor = doc["spec"]["predictor"]
    if "containers" in predictor:
        pod = _pod(predictor["containers"], predictor.get("volumes", []))
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    else:
        uri = predictor["model"]["storageUri"]
        assert uri.startswith(("pvc://cvmfs-models/", "cvmfs://models.example.org/"))


def test_the_checker_catches_mistakes() -> None:
    doc = dict(documents())["cluster-storage-container.yaml:ClusterStorageContainer/cvmfs-ml"]
    broken = {**doc, "spec": {**doc["spec"], "supportedUriFormat": [{"prefix": "cvmfs://"}]}}
    assert any("unknown field" in e for e in check_against_model(broken, KSERVE_KINDS[
        ("serving.kserve.io/v1alpha1", "ClusterStorageContainer")], "csc"))  # fmt: skip
    nested = {**doc, "spec": {**doc["spec"], "container": {**doc["spec"]["container"], "envs": []}}}
    assert check_against_model(nested, "V1alpha1ClusterStorageContainer", "csc") == [
        "csc.spec.container.envs: unknown field of V1Container"
    ]
    bad_container = {**doc["spec"]["container"], "imagePullPolicy": 3}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_pod([bad_container]), K8S_VERSION, strict=True)
