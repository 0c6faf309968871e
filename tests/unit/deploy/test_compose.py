"""docker-compose.yml: valid for compose-go (what `docker compose` runs) with and without the gpu profile, the
whole stack with health checks and ordered start, and placeholder secrets refused outside local mode."""

from __future__ import annotations

import re

import pytest
import yaml
from pydantic import ValidationError

from afina.core.settings import Settings
from tests.support.environment import settings_from_environment
from tests.unit.deploy.conftest import ROOT, run, tool

AFINA_SERVICES = {"gateway", "ingest", "trainer", "exporter", "evaluator", "batcher"}
INFRASTRUCTURE = {"postgres", "redis", "minio", "ollama", "prometheus", "grafana", "redis-exporter"}
ONE_SHOTS = {"minio-init", "migrate"}


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict:
    import os

    # no .env or variable of the developer's may change what is checked
    command = [tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "--env-file", "/dev/null", *args,
               "config"]
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("AFINA_", "MINIO_", "POSTGRES_", "GRAFANA_", "COMPOSE_"))}
    result = run(command, env={**environment, **(env or {})})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def stack() -> dict:
    return compose_config()


@pytest.fixture(scope="module")
def gpu_stack() -> dict:
    return compose_config("--profile", "gpu", "--profile", "gpu-x2")


def test_the_whole_stack_is_there(stack: dict, gpu_stack: dict) -> None:
    assert AFINA_SERVICES | INFRASTRUCTURE | ONE_SHOTS <= set(stack["services"])
    assert not {"trainer-gpu0", "trainer-gpu1"} & set(stack["services"])
    assert set(gpu_stack["services"]) == set(stack["services"]) | {"trainer-gpu0", "trainer-gpu1"}
    one_gpu = compose_config("--profile", "gpu")
    assert set(one_gpu["services"]) == set(stack["services"]) | {"trainer-gpu0"}


def test_every_long_running_service_has_a_health_check_and_waits_for_healthy_dependencies(gpu_stack: dict) -> None:
    for name, service in gpu_stack["services"].items():
        if name in ONE_SHOTS:
            assert service.get("restart") == "no", name
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, condition in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            assert condition["condition"] == expected, (name, dependency)
    for worker in ("gateway", "ingest", "trainer", "trainer-gpu0", "trainer-gpu1", "exporter", "evaluator",
                   "batcher"):
        depends = gpu_stack["services"][worker]["depends_on"]
        assert {"postgres", "redis", "minio", "minio-init", "migrate"} <= set(depends), worker


def test_state_lives_in_named_volumes_and_configuration_is_mounted_read_only(gpu_stack: dict) -> None:
    for name, service in gpu_stack["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "volume":
                assert volume["source"] in gpu_stack["volumes"], (name, volume)
            else:
                assert volume["type"] == "bind" and volume.get("read_only") is True, (name, volume)
                assert volume["source"].startswith(str(ROOT / "deploy")), (name, volume)
    for name, path in [("postgres", "/var/lib/postgresql/data"), ("redis", "/data"), ("minio", "/data"),
                       ("ollama", "/root/.ollama"), ("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")]:
        targets = {v["target"]: v["type"] for v in gpu_stack["services"][name]["volumes"]}
        assert targets.get(path) == "volume", name


def test_redis_keeps_the_queue_on_disk(stack: dict) -> None:
    command = stack["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_the_services_use_ollama_and_share_one_registry_broker_and_store(stack: dict) -> None:
    environments = {name: stack["services"][name]["environment"] for name in AFINA_SERVICES}
    assert environments["gateway"]["AFINA_INFERENCE_BACKEND"] == "ollama"
    for name, environment in environments.items():
        assert environment["AFINA_OLLAMA_URL"] == "http://ollama:11434", name
        assert environment["AFINA_BROKER_URL"] == "redis://redis:6379/0", name
        assert environment["AFINA_DATABASE_URL"].endswith("@postgres:5432/afina"), name
        assert environment["AFINA_S3_ENDPOINT"] == "minio:9000", name
        assert environment["AFINA_METRICS_HOST"] == "0.0.0.0", name  # Prometheus scrapes from another container


def test_each_gpu_trainer_is_pinned_to_its_own_gpu_only_under_the_gpu_profiles(stack: dict, gpu_stack: dict) -> None:
    cpu = stack["services"]["trainer"]
    assert "resources" not in cpu.get("deploy", {}) and cpu["environment"]["AFINA_TRAINER_DEVICE"] == "cpu"
    pinned = []
    for name, profile in [("trainer-gpu0", "gpu"), ("trainer-gpu1", "gpu-x2")]:
        gpu = gpu_stack["services"][name]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia" and "count" not in device
        pinned += device["device_ids"]
        assert gpu["environment"]["AFINA_TRAINER_DEVICE"] == "cuda" and gpu["profiles"] == [profile]
        assert {"AFINA_GPU_CLASSES", "AFINA_GPU_CLASS", "AFINA_DEFAULT_GPU_CLASS"} <= set(gpu["environment"])
    assert pinned == ["0", "1"]  # one job per GPU: no two trainers share a device
    # a GPU host turns the CPU trainer off from .env
    assert compose_config(env={"AFINA_CPU_TRAINERS": "0"})["services"]["trainer"]["deploy"]["replicas"] == 0


def test_prometheus_and_grafana_get_their_configuration(stack: dict) -> None:
    prometheus = {v["target"]: v["source"] for v in stack["services"]["prometheus"]["volumes"]}
    assert prometheus["/etc/prometheus/prometheus.yml"] == str(ROOT / "deploy/prometheus/prometheus.yml")
    assert prometheus["/etc/prometheus/rules"] == str(ROOT / "deploy/prometheus/rules")
    grafana = {v["target"]: v["source"] for v in stack["services"]["grafana"]["volumes"]}
    assert grafana["/etc/grafana/provisioning"] == str(ROOT / "deploy/grafana/provisioning")
    assert grafana["/var/lib/grafana/dashboards"] == str(ROOT / "deploy/grafana/dashboards")


def test_every_image_is_pinned(gpu_stack: dict) -> None:
    for name, service in gpu_stack["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (name, image)


def test_env_example_names_every_variable_the_compose_file_reads() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)[:?}-]", text))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, sorted(used - example)


def _settings_from(environment: dict[str, str]) -> Settings:
    return settings_from_environment(environment)


def test_the_stack_defaults_start_in_local_mode(gpu_stack: dict) -> None:
    afina = [name for name, service in gpu_stack["services"].items() if "AFINA_HOME" in service.get("environment", {})]
    assert AFINA_SERVICES | {"trainer-gpu0", "trainer-gpu1"} <= set(afina)
    for name in afina:  # each raises on a refused setting (an empty GPU class is none, "{}" no classes)
        assert _settings_from(gpu_stack["services"][name]["environment"]).environment == "local"


def test_production_with_the_placeholder_secrets_is_refused_naming_the_variable() -> None:
    production = compose_config(env={"AFINA_ENVIRONMENT": "production"})
    for name in AFINA_SERVICES:
        with pytest.raises(ValidationError, match="AFINA_S3_ACCESS_KEY is a placeholder"):
            _settings_from(production["services"][name]["environment"])
    # the .env.example values are the same placeholders
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    with_example = compose_config(env={**example, "AFINA_ENVIRONMENT": "production"})
    with pytest.raises(ValidationError, match="AFINA_S3_ACCESS_KEY is a placeholder"):
        _settings_from(with_example["services"]["gateway"]["environment"])
    real = compose_config(env={"AFINA_ENVIRONMENT": "production", "MINIO_ROOT_USER": "afina-prod-7f3a",
                               "MINIO_ROOT_PASSWORD": "q8Vn2rXw0pLk5sZt"})
    assert _settings_from(real["services"]["gateway"]["environment"]).environment == "production"
