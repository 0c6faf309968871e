"""The multi-process stack (PostgreSQL, Redis, SeaweedFS, four service processes) for end-to-end tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from afina.deploy.processes import stop
from afina.deploy.runner import StackState, down, up_services
from tests.support.prometheus import PrometheusServer, start_prometheus


@pytest.fixture(scope="session")
def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One materialized base model for every end-to-end test (the conversion takes ~20 s)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def services_stack(request: pytest.FixtureRequest, tmp_path: Path, postgres_database: str, redis_url: str,
                   shared_model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StackState]:
    """The stack; a test that also asks for ``contract_ollama`` gets it as the stack's Ollama (AFINA_OLLAMA_URL),
    so its exporter registers every model there."""
    if "contract_ollama" in request.fixturenames:
        monkeypatch.setenv("AFINA_OLLAMA_URL", request.getfixturevalue("contract_ollama").url)
    redis_db = random.randint(1, 15)
    monkeypatch.setenv("AFINA_DATABASE_URL", postgres_database)
    monkeypatch.setenv("AFINA_BROKER_URL", f"{redis_url}/{redis_db}")
    monkeypatch.setenv("AFINA_MODEL_CACHE_DIR", str(shared_model_cache))
    # short leases so a killed worker's job is recovered within seconds, not minutes
    monkeypatch.setenv("AFINA_LEASE_S", "8")
    monkeypatch.setenv("AFINA_HEARTBEAT_S", "1")
    monkeypatch.setenv("AFINA_RECOVERY_INTERVAL_S", "2")
    monkeypatch.setenv("AFINA_LOG_JSON", "false")
    home = tmp_path / "stack"
    state = up_services(home)
    try:
        yield state
    finally:
        down(home)
        import redis

        redis.Redis.from_url(f"{redis_url}/{redis_db}").flushdb()


@pytest.fixture
def prometheus(services_stack: StackState, tmp_path: Path) -> Iterator[PrometheusServer]:
    """Debian's Prometheus scraping every process of the stack each second, with afina's alert rules loaded."""
    server = start_prometheus(services_stack, tmp_path / "prometheus")
    try:
        yield server
    finally:
        stop(server.process.pid)
