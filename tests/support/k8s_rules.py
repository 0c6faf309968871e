"""Rules every rendered afina manifest set must keep, beyond what the Kubernetes schemas check.

``check_manifests(objects)`` takes the objects ``kubectl kustomize`` rendered for one overlay and returns one
line per broken rule (empty: all kept). ``check_keda(objects)`` validates KEDA's objects against the fields of
KEDA's CRDs (the Kubernetes schemas know nothing of them). The tests feed them every overlay, and broken copies
of one (a container without requests or probes, a namespace without a default-deny NetworkPolicy) to prove
that they fail.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator
from typing import Any

import jsonschema

from afina.core.queue.names import GPU_CLASS_NAME, QUEUE_BATCH, QUEUE_EVALUATE, QUEUE_EXPORT, QUEUE_INGEST, QUEUE_TRAIN

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
GPU = "nvidia.com/gpu"
KNOWN_QUEUES = {QUEUE_INGEST, QUEUE_TRAIN, QUEUE_EXPORT, QUEUE_EVALUATE, QUEUE_BATCH}
# afina.core.queue.names.train_queue: train, train.<class>, train.x<N>, train.<class>.x<N>
TRAIN_QUEUE = re.compile(rf"{QUEUE_TRAIN}(\.{GPU_CLASS_NAME})?(\.x[2-8])?")
# Secrets that other controllers create (cert-manager writes the Ingress' certificate)
EXTERNALLY_CREATED_SECRETS = {"afina-gateway-tls"}

Obj = dict[str, Any]


def check_manifests(objects: list[Obj]) -> list[str]:
    problems: list[str] = []
    for check in (_workload_rules, _network_rules, _disruption_rules, _autoscaling_rules, _reference_rules):
        problems.extend(check(objects))
    return problems


# --- workloads: requests, probes, privileges, tokens, images, GPUs -------------------------------------------

def pod_template(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def workloads(objects: Iterable[Obj]) -> Iterator[Obj]:
    return (obj for obj in objects if obj.get("kind") in WORKLOAD_KINDS)


def _name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _workload_rules(objects: list[Obj]) -> Iterator[str]:
    for obj in workloads(objects):
        where = _name(obj)
        pod = pod_template(obj)["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            yield f"{where}: automountServiceAccountToken must be false (no pod here calls the Kubernetes API)"
        pod_security = pod.get("securityContext") or {}
        if pod_security.get("runAsNonRoot") is not True:
            yield f"{where}: securityContext.runAsNonRoot must be true"
        if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            yield f"{where}: securityContext.seccompProfile.type must be RuntimeDefault"
        containers = [(c, False) for c in pod.get("initContainers", [])] + [(c, True) for c in pod["containers"]]
        for container, main in containers:
            at = f"{where} container {container['name']}"
            yield from _container_rules(at, container, probes=main and obj["kind"] in LONG_RUNNING_KINDS)
        gpus = [c for c in pod["containers"] if GPU in (c.get("resources", {}).get("limits") or {})]
        if gpus:
            tolerations = pod.get("tolerations") or []
            if not any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in tolerations):
                yield f"{where}: asks for {GPU} but does not tolerate the {GPU}:NoSchedule taint of GPU nodes"
            if not pod.get("nodeSelector"):
                yield f"{where}: asks for {GPU} but has no nodeSelector for its GPU pool"


def _container_rules(at: str, container: Obj, *, probes: bool) -> Iterator[str]:
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for resource in ("cpu", "memory"):
        if resource not in requests:
            yield f"{at}: no {resource} request"
    if "memory" not in limits:
        yield f"{at}: no memory limit"
    if GPU in requests or GPU in limits:
        if requests.get(GPU) != limits.get(GPU):
            yield f"{at}: {GPU} request and limit differ"
    if probes:
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                yield f"{at}: no {probe}"
    security = container.get("securityContext") or {}
    if security.get("allowPrivilegeEscalation") is not False:
        yield f"{at}: securityContext.allowPrivilegeEscalation must be false"
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        yield f"{at}: securityContext.capabilities must drop ALL"
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2] if "@" not in image else "digest"
    if not tag or tag == "latest":
        yield f"{at}: image {image!r} has no pinned tag"


# --- network: default deny, every workload has its own policy, only the gateway is open -----------------------

def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects ``labels``; {} selects everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _is_default_deny(policy: Obj) -> bool:
    spec = policy["spec"]
    return (spec.get("podSelector") == {} and set(spec.get("policyTypes") or []) == {"Ingress", "Egress"}
            and not spec.get("ingress") and not spec.get("egress"))


def _admits_anyone(rule: Obj) -> bool:
    sources = rule.get("from")
    if not sources:
        return True
    for source in sources:
        if source.get("namespaceSelector") == {} and not source.get("podSelector"):
            return True
        if (source.get("ipBlock") or {}).get("cidr") in {"0.0.0.0/0", "::/0"}:
            return True
    return False


def _network_rules(objects: list[Obj]) -> Iterator[str]:
    policies = [obj for obj in objects if obj.get("kind") == "NetworkPolicy"]
    if not any(_is_default_deny(policy) for policy in policies):
        yield "no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)"
    own = [policy for policy in policies if policy["spec"].get("podSelector") != {}]
    for obj in workloads(objects):
        labels = pod_template(obj)["metadata"].get("labels") or {}
        selecting = [policy for policy in own if _selects(policy["spec"]["podSelector"], labels)]
        if not selecting:
            yield f"{_name(obj)}: no NetworkPolicy selects its pods (beyond the namespace-wide ones)"
        open_to_all = [policy["metadata"]["name"] for policy in selecting
                       if any(_admits_anyone(rule) for rule in policy["spec"].get("ingress") or [])]
        if open_to_all and labels.get("afina.dev/role") != "gateway":
            yield f"{_name(obj)}: NetworkPolicy {open_to_all} admits traffic from anywhere; only the gateway may"


# --- disruption budgets ---------------------------------------------------------------------------------------

def _disruption_rules(objects: list[Obj]) -> Iterator[str]:
    budgets = [obj for obj in objects if obj.get("kind") == "PodDisruptionBudget"]
    for obj in objects:
        if obj.get("kind") not in {"Deployment", "StatefulSet"}:
            continue
        labels = pod_template(obj)["metadata"].get("labels") or {}
        if not any(_selects(budget["spec"]["selector"], labels) for budget in budgets):
            yield f"{_name(obj)}: no PodDisruptionBudget"


# --- autoscaling: KEDA scales the Deployment that consumes the queue it watches --------------------------------

def worker_queues(deployment: Obj) -> set[str]:
    """The queues a Celery worker Deployment consumes (its ``-Q a,b`` argument)."""
    queues: set[str] = set()
    for container in pod_template(deployment)["spec"]["containers"]:
        words = [*container.get("command", []), *container.get("args", [])]
        words = [w for word in words for w in (shlex.split(word) if " " in word else [word])]
        for flag, value in zip(words, words[1:], strict=False):
            if flag in {"-Q", "--queues"}:
                queues.update(value.split(","))
    return queues


def _is_known_queue(queue: str) -> bool:
    return queue in KNOWN_QUEUES or bool(TRAIN_QUEUE.fullmatch(queue))


def _autoscaling_rules(objects: list[Obj]) -> Iterator[str]:
    deployments = {obj["metadata"]["name"]: obj for obj in objects if obj.get("kind") == "Deployment"}
    auths = {obj["metadata"]["name"] for obj in objects if obj.get("kind") == "TriggerAuthentication"}
    scaled_names = set()
    for obj in objects:
        if obj.get("kind") == "HorizontalPodAutoscaler":
            scaled_names.add(obj["spec"]["scaleTargetRef"]["name"])
        if obj.get("kind") != "ScaledObject":
            continue
        where = _name(obj)
        target = obj["spec"]["scaleTargetRef"]["name"]
        scaled_names.add(target)
        if target not in deployments:
            yield f"{where}: scales Deployment {target}, which is not rendered"
            continue
        consumed = worker_queues(deployments[target])
        for trigger in obj["spec"]["triggers"]:
            ref = (trigger.get("authenticationRef") or {}).get("name")
            if ref is not None and ref not in auths:
                yield f"{where}: authenticationRef {ref} is not a rendered TriggerAuthentication"
            if trigger["type"] != "redis":
                continue
            queue = trigger["metadata"].get("listName", "")
            if not _is_known_queue(queue):
                yield f"{where}: watches Redis list {queue!r}, which is no afina queue"
            elif queue not in consumed:
                yield f"{where}: watches queue {queue!r} but {target} consumes {sorted(consumed)}"
    for name in scaled_names & set(deployments):
        if "replicas" in deployments[name]["spec"]:
            yield f"Deployment/{name}: sets spec.replicas although an autoscaler owns it (each apply would reset it)"


# --- references: every ConfigMap and Secret a pod or KEDA names is rendered, with the key it names -----------

def _reference_rules(objects: list[Obj]) -> Iterator[str]:
    data: dict[tuple[str, str], set[str]] = {}
    for obj in objects:
        if obj.get("kind") in {"ConfigMap", "Secret"}:
            keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
            data[(obj["kind"], obj["metadata"]["name"])] = keys

    def missing(kind: str, name: str, key: str | None = None) -> str | None:
        if kind == "Secret" and name in EXTERNALLY_CREATED_SECRETS:
            return None
        if (kind, name) not in data:
            return f"{kind} {name} is not rendered"
        if key is not None and key not in data[(kind, name)]:
            return f"{kind} {name} has no key {key}"
        return None

    for obj in workloads(objects):
        pod = pod_template(obj)["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            found = []
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    found.append(missing("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source:
                    found.append(missing("Secret", source["secretRef"]["name"]))
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {})
                if "secretKeyRef" in ref:
                    found.append(missing("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
                if "configMapKeyRef" in ref:
                    found.append(missing("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]))
            for problem in filter(None, found):
                yield f"{_name(obj)} container {container['name']}: {problem}"
    for obj in objects:
        if obj.get("kind") == "TriggerAuthentication":
            for ref in obj["spec"].get("secretTargetRef") or []:
                problem = missing("Secret", ref["name"], ref["key"])
                if problem:
                    yield f"{_name(obj)}: {problem}"


# --- KEDA: the fields of its CRDs (keda.sh/v1alpha1), strict -------------------------------------------------

_INT = {"type": "integer", "minimum": 0}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# the trigger metadata each scaler afina uses understands (KEDA ignores unknown keys: a typo would be silent)
TRIGGER_METADATA = {
    "redis": {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "listName",
              "listLength", "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl", "usernameFromEnv",
              "passwordFromEnv"},
    "prometheus": {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                   "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout", "authModes"},
}
_REQUIRED_METADATA = {"redis": {"listName"}, "prometheus": {"serverAddress", "query", "threshold"}}

_OBJECT_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                   "apiVersion": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
                },
                "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                             "additionalProperties": False,
                             "properties": {"failureThreshold": _INT, "replicas": _INT,
                                            "behavior": {"type": "string"}}},
                "advanced": {"type": "object", "additionalProperties": False,
                             "properties": {"restoreToOriginalReplicaCount": {"type": "boolean"},
                                            "horizontalPodAutoscalerConfig": {"type": "object"},
                                            "scalingModifiers": {"type": "object"}}},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"}, "name": {"type": "string"},
                            "metadata": _STRING_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object", "required": ["name"], "additionalProperties": False,
                                "properties": {"name": {"type": "string"},
                                               "kind": {"enum": ["TriggerAuthentication",
                                                                 "ClusterTriggerAuthentication"]}},
                            },
                        },
                    },
                },
            },
        },
    },
}
_SECRET_TARGET = {"type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                  "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                 "key": {"type": "string"}}}
TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {
                "secretTargetRef": {"type": "array", "items": _SECRET_TARGET},
                "env": {"type": "array", "items": {
                    "type": "object", "required": ["parameter", "name"], "additionalProperties": False,
                    "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                   "containerName": {"type": "string"}}}},
                "podIdentity": {"type": "object"},
                "hashiCorpVault": {"type": "object"},
                "azureKeyVault": {"type": "object"},
                "awsSecretManager": {"type": "object"},
                "gcpSecretManager": {"type": "object"},
                "configMapTargetRef": {"type": "array", "items": _SECRET_TARGET},
            },
        },
    },
}
KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT_SCHEMA, "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA}


def check_keda(objects: list[Obj]) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("apiVersion", "").split("/")[0] != "keda.sh":
            continue
        schema = KEDA_SCHEMAS.get(obj.get("kind"))
        if schema is None:
            problems.append(f"{obj.get('kind')}: a KEDA kind these checks do not know")
            continue
        for error in jsonschema.Draft202012Validator(schema).iter_errors(obj):
            path = "/".join(map(str, error.absolute_path))
            problems.append(f"{_name(obj)}: {path}: {error.message}")
        if obj["kind"] != "ScaledObject":
            continue
        for index, trigger in enumerate(obj["spec"].get("triggers") or []):
            known = TRIGGER_METADATA.get(trigger.get("type"))
            if known is None:
                problems.append(f"{_name(obj)}: trigger {index} has type {trigger.get('type')!r}, not one afina uses")
                continue
            metadata = trigger.get("metadata") or {}
            for key in sorted(set(metadata) - known):
                problems.append(f"{_name(obj)}: trigger {index} ({trigger['type']}) has unknown metadata {key!r}")
            for key in sorted(_REQUIRED_METADATA[trigger["type"]] - set(metadata)):
                problems.append(f"{_name(obj)}: trigger {index} ({trigger['type']}) lacks metadata {key!r}")
    return problems
