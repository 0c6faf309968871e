"""k8s/: every overlay renders (kubectl kustomize), every object validates against the Kubernetes schemas
(kubernetes-validate, strict) or KEDA's fields, and the rules of tests/support/k8s_rules.py hold; broken copies
of a rendered overlay fail those same checks."""

from __future__ import annotations

import ast
import base64
import copy
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
from pydantic import ValidationError

from afina.core.queue.names import QUEUE_EVALUATE, QUEUE_EXPORT, QUEUE_INGEST, QUEUE_TRAIN
from afina.core.settings import Settings
from tests.support.environment import settings_from_environment
from tests.support.k8s_rules import check_keda, check_manifests, pod_template, worker_queues
from tests.unit.deploy.conftest import OVERLAYS, ROOT, render_overlay

KUBERNETES_VERSION = "1.33.0"  # the oldest minor the manifests promise to run on
Obj = dict


def by_name(objects: list[Obj], kind: str, name: str) -> Obj:
    return next(obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name)


def schema_errors(obj: Obj) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{obj['kind']}/{obj['metadata']['name']}: {error.message}"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered: dict, overlay: str) -> None:
    objects = rendered[overlay]
    standard = [obj for obj in objects if not obj["apiVersion"].startswith("keda.sh/")]
    assert len(standard) > 20
    assert [error for obj in standard for error in schema_errors(obj)] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects_carry_only_fields_keda_knows(rendered: dict, overlay: str) -> None:
    kinds = {obj["kind"] for obj in rendered[overlay] if obj["apiVersion"].startswith("keda.sh/")}
    assert kinds == {"ScaledObject", "TriggerAuthentication"}
    assert check_keda(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifest_rules_hold(rendered: dict, overlay: str) -> None:
    assert check_manifests(rendered[overlay]) == []


# --- the checks fail what they must ------------------------------------------------------------------------

def production_copy(rendered: dict) -> list[Obj]:
    return copy.deepcopy(rendered["production"])


def test_a_container_without_requests_or_probes_fails(rendered: dict) -> None:
    objects = production_copy(rendered)
    gateway = pod_template(by_name(objects, "Deployment", "afina-gateway"))["spec"]["containers"][0]
    del gateway["resources"]["requests"]
    del gateway["livenessProbe"]
    problems = check_manifests(objects)
    assert "Deployment/afina-gateway container gateway: no cpu request" in problems
    assert "Deployment/afina-gateway container gateway: no memory request" in problems
    assert "Deployment/afina-gateway container gateway: no livenessProbe" in problems


def test_a_namespace_without_a_default_deny_policy_or_a_workload_without_its_own_policy_fails(rendered: dict) -> None:
    objects = [obj for obj in production_copy(rendered)
               if not (obj["kind"] == "NetworkPolicy" and obj["metadata"]["name"] in {"default-deny", "afina-to-ollama",
                                                                                       "ollama-ingress"})]
    problems = check_manifests(objects)
    assert "no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)" in problems
    assert "StatefulSet/ollama: no NetworkPolicy selects its pods (beyond the namespace-wide ones)" in problems


def test_a_worker_open_to_anyone_fails(rendered: dict) -> None:
    objects = production_copy(rendered)
    by_name(objects, "NetworkPolicy", "metrics-scrape")["spec"]["ingress"][0].pop("from")
    problems = check_manifests(objects)
    assert any(p.startswith("Deployment/afina-trainer: NetworkPolicy ['metrics-scrape'] admits traffic from anywhere")
               for p in problems), problems


def test_a_gpu_pod_without_the_taint_toleration_or_a_mounted_token_fails(rendered: dict) -> None:
    objects = production_copy(rendered)
    trainer = pod_template(by_name(objects, "Deployment", "afina-trainer-a100-80gb"))["spec"]
    trainer.pop("tolerations")
    trainer["automountServiceAccountToken"] = True
    problems = check_manifests(objects)
    assert any("does not tolerate the nvidia.com/gpu:NoSchedule taint" in p for p in problems)
    assert "Deployment/afina-trainer-a100-80gb: automountServiceAccountToken must be false " \
           "(no pod here calls the Kubernetes API)" in problems


def test_a_scaled_object_on_a_queue_its_deployment_does_not_consume_fails(rendered: dict) -> None:
    objects = production_copy(rendered)
    by_name(objects, "ScaledObject", "afina-exporter")["spec"]["triggers"][0]["metadata"]["listName"] = "train"
    by_name(objects, "ScaledObject", "afina-ingest")["spec"]["triggers"][0]["metadata"]["listName"] = "celery"
    problems = check_manifests(objects)
    assert "ScaledObject/afina-exporter: watches queue 'train' but afina-exporter consumes ['export']" in problems
    assert "ScaledObject/afina-ingest: watches Redis list 'celery', which is no afina queue" in problems


def test_a_missing_disruption_budget_or_secret_key_fails(rendered: dict) -> None:
    objects = [obj for obj in production_copy(rendered)
               if not (obj["kind"] == "PodDisruptionBudget" and obj["metadata"]["name"] == "afina-exporter")]
    secret = next(obj for obj in objects if obj["kind"] == "Secret")
    del secret["data"]["REDIS_PASSWORD"]
    problems = check_manifests(objects)
    assert "Deployment/afina-exporter: no PodDisruptionBudget" in problems
    assert any(p.startswith("TriggerAuthentication/afina-redis: Secret afina-secrets-") and
               p.endswith("has no key REDIS_PASSWORD") for p in problems), problems


def test_keda_and_kubernetes_schemas_reject_unknown_fields(rendered: dict) -> None:
    objects = production_copy(rendered)
    scaled = by_name(objects, "ScaledObject", "afina-trainer")
    scaled["spec"]["minReplicas"] = 0  # HPA's field name, not KEDA's
    scaled["spec"]["triggers"][0]["metadata"]["queueName"] = "train"  # not the redis scaler's
    problems = check_keda(objects)
    assert any("Additional properties are not allowed ('minReplicas' was unexpected)" in p for p in problems)
    assert "ScaledObject/afina-trainer: trigger 0 (redis) has unknown metadata 'queueName'" in problems
    deployment = by_name(objects, "Deployment", "afina-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo of "resources"
    assert schema_errors(deployment)


def test_an_overlay_that_breaks_a_rule_fails_at_render_time(tmp_path: Path) -> None:
    """The same path as CI: an overlay (here, one that strips the trainer's probes) rendered and checked."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "broken"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../dev]\n"
        "patches:\n"
        "  - target: {kind: Deployment, name: afina-trainer}\n"
        "    patch: |-\n"
        "      - {op: remove, path: /spec/template/spec/containers/0/readinessProbe}\n"
        "      - {op: remove, path: /spec/template/spec/containers/0/resources/requests}\n")
    problems = check_manifests(render_overlay(overlay))
    assert "Deployment/afina-trainer container trainer: no readinessProbe" in problems
    assert "Deployment/afina-trainer container trainer: no cpu request" in problems


# --- what the overlays promise --------------------------------------------------------------------------------

def test_keda_scales_every_worker_on_its_real_celery_queue(rendered: dict) -> None:
    for overlay in OVERLAYS:
        objects = rendered[overlay]
        watched = {}
        for scaled in (obj for obj in objects if obj["kind"] == "ScaledObject"):
            lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
            watched[scaled["spec"]["scaleTargetRef"]["name"]] = lists
        assert watched["afina-ingest"] == {QUEUE_INGEST}
        assert watched["afina-exporter"] == {QUEUE_EXPORT}
        assert watched["afina-evaluator"] == {QUEUE_EVALUATE}
        assert QUEUE_TRAIN in watched["afina-trainer"]


def test_production_trainers_run_one_per_gpu_on_their_gpu_class_pool(rendered: dict) -> None:
    objects = rendered["production"]
    trainers = [obj for obj in objects if obj["kind"] == "Deployment"
                and obj["metadata"]["labels"].get("app.kubernetes.io/component") == "trainer"]
    assert {t["metadata"]["name"] for t in trainers} == {"afina-trainer", "afina-trainer-a100-80gb"}
    for trainer in trainers:
        pod = pod_template(trainer)["spec"]
        gpu_class = pod["nodeSelector"]["afina.dev/gpu-class"]
        assert trainer["metadata"]["labels"]["afina.dev/gpu-class"] == gpu_class
        assert f"{QUEUE_TRAIN}.{gpu_class}" in worker_queues(trainer)
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["args"][container["args"].index("--concurrency") + 1] == "1"  # one job, one GPU
        assert pod["terminationGracePeriodSeconds"] >= 300  # a checkpoint of a large model on SIGTERM
        scaled = by_name(objects, "ScaledObject", trainer["metadata"]["name"])
        assert scaled["spec"]["minReplicaCount"] == 0
    assert worker_queues(by_name(objects, "Deployment", "afina-trainer")) == {QUEUE_TRAIN, "train.l4"}
    ollama = pod_template(by_name(objects, "StatefulSet", "ollama"))["spec"]
    assert ollama["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert by_name(objects, "StatefulSet", "ollama")["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "models"


def test_production_exporters_and_evaluators_run_on_the_cpu_pool(rendered: dict) -> None:
    for name in ("afina-exporter", "afina-evaluator"):
        pod = pod_template(by_name(rendered["production"], "Deployment", name))["spec"]
        assert pod["nodeSelector"] == {"afina.dev/pool": "cpu"}, name
        assert all("nvidia.com/gpu" not in (c["resources"].get("limits") or {}) for c in pod["containers"]), name


def _exporter_disk_rule() -> tuple[int, int]:
    """DISK_FACTOR and BYTES_PER_16BIT_PARAM of the exporter's preflight, read from its source (no torch import)."""
    tree = ast.parse((ROOT / "services/exporter/afina/exporter/pipeline.py").read_text())
    values = {node.targets[0].id: node.value.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in {"DISK_FACTOR", "BYTES_PER_16BIT_PARAM"}}
    return values["DISK_FACTOR"], values["BYTES_PER_16BIT_PARAM"]


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_exporter_asks_for_the_disk_its_preflight_demands(rendered: dict, overlay: str) -> None:
    exporter = by_name(rendered[overlay], "Deployment", "afina-exporter")
    parameters = int(exporter["metadata"]["annotations"]["afina.dev/max-export-parameters"])
    factor, bytes_per_param = _exporter_disk_rule()
    pod = pod_template(exporter)["spec"]
    requested = _bytes(pod["containers"][0]["resources"]["requests"]["ephemeral-storage"])
    assert requested >= factor * bytes_per_param * parameters
    data = next(volume for volume in pod["volumes"] if volume["name"] == "data")
    assert _bytes(data["emptyDir"]["sizeLimit"]) >= factor * bytes_per_param * parameters


def _gateway_environment(objects: list[Obj]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for source in pod_template(by_name(objects, "Deployment", "afina-gateway"))["spec"]["containers"][0]["envFrom"]:
        if "configMapRef" in source:
            environment.update(by_name(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = by_name(objects, "Secret", source["secretRef"]["name"])
            environment.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    return environment


def _settings(environment: dict[str, str]) -> Settings:
    return settings_from_environment(environment)


def test_production_with_the_committed_placeholder_secrets_is_refused_naming_the_variable(rendered: dict) -> None:
    environment = _gateway_environment(rendered["production"])
    assert environment["AFINA_ENVIRONMENT"] == "production"
    with pytest.raises(ValidationError, match="AFINA_S3_ACCESS_KEY is a placeholder"):
        _settings(environment)
    environment.update(AFINA_S3_ACCESS_KEY="afina-prod-7f3a", AFINA_S3_SECRET_KEY="q8Vn2rXw0pLk5sZt")
    assert _settings(environment).environment == "production"


def test_dev_runs_in_local_mode_with_everything_in_the_namespace(rendered: dict) -> None:
    objects = rendered["dev"]
    assert _settings(_gateway_environment(objects)).environment == "local"
    assert {"redis", "postgres", "minio", "ollama"} <= {obj["metadata"]["name"] for obj in objects
                                                        if obj["kind"] == "StatefulSet"}
    assert {"redis", "postgres", "store", "ollama"} <= {obj["metadata"]["name"] for obj in objects
                                                        if obj["kind"] == "Service"}
    production = {obj["metadata"]["name"]: obj for obj in rendered["production"] if obj["kind"] == "Service"}
    assert {production[name]["spec"]["type"] for name in ("redis", "postgres")} == {"ExternalName"}
    config = next(obj for obj in rendered["production"] if obj["kind"] == "ConfigMap")["data"]
    assert config["AFINA_S3_SECURE"] == "true" and config["AFINA_S3_ENDPOINT"] != "store:9000"
