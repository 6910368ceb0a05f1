"""Every overlay renders with the real kubectl and validates against the Kubernetes schemas."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.k8s.k8s_utils import OVERLAYS, Rendered

# The oldest release these manifests target (the preStop `sleep` action is on by default from
# 1.30) and the newest that kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRD_SCHEMA_DIR = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}


def _validate_builtin(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def _validate_crd(obj: dict[str, Any]) -> None:
    name = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    schema = json.loads((CRD_SCHEMA_DIR / name).read_text())
    jsonschema.Draft202012Validator(schema).validate(obj)


def _validate(obj: dict[str, Any], version: str) -> None:
    if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
        _validate_crd(obj)
    else:
        _validate_builtin(obj, version)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_without_warnings(rendered: dict[str, Rendered], overlay: str) -> None:
    result = rendered[overlay]
    assert result.objects, f"{overlay} rendered nothing"
    # kustomize prints deprecations (commonLabels, bases, patchesStrategicMerge...) on stderr.
    assert result.stderr.strip() == "", f"{overlay}: kubectl kustomize warned:\n{result.stderr}"
    names = [
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in result.objects
    ]
    assert len(names) == len(set(names)), f"{overlay}: duplicate objects"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_offline(
    rendered: dict[str, Rendered], overlay: str, version: str
) -> None:
    failures = []
    for obj in rendered[overlay].objects:
        try:
            _validate(obj, version)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_every_kind_has_a_schema(rendered: dict[str, Rendered]) -> None:
    """No object slips through unvalidated for lack of a schema."""
    for result in rendered.values():
        for obj in result.objects:
            if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
                continue
            for version in KUBERNETES_VERSIONS:
                try:
                    _validate_builtin(obj, version)
                except kubernetes_validate.SchemaNotFoundError as exc:  # pragma: no cover
                    pytest.fail(exc.message)


def test_validation_rejects_broken_objects(rendered: dict[str, Rendered]) -> None:
    """The validators catch a misplaced field, a wrong type and a bad CRD field."""
    cpu = rendered["cpu"]
    deployment = copy.deepcopy(cpu.get("Deployment", "ranker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, KUBERNETES_VERSIONS[-1])

    service = copy.deepcopy(cpu.get("Service", "ranker-headless"))
    service["spec"]["ports"][0]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(service, KUBERNETES_VERSIONS[0])

    monitor = copy.deepcopy(cpu.get("ServiceMonitor", "ranker"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor, KUBERNETES_VERSIONS[-1])

    rule = copy.deepcopy(cpu.get("PrometheusRule", "recsys-alerts"))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        _validate(rule, KUBERNETES_VERSIONS[-1])
