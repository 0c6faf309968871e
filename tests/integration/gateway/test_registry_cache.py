"""Two gateway processes on one registry (SQLite, and PostgreSQL as in production) keep key grants and routes in
memory, yet a key revoked with ``afina keys revoke`` is refused by the very next request on each of them, and a
route written or deleted through one is seen by the next request on the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port, stop_process, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Process:
    process: subprocess.Popen
    url: str


def gateway_env(home: Path, database_url: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AFINA_")}
    dead_upstream = f"http://127.0.0.1:{free_port()}/v1"
    env.update(AFINA_HOME=str(home), AFINA_LOG_JSON="false", AFINA_LOG_LEVEL="WARNING",
               AFINA_UPSTREAMS=json.dumps({"cloud": {"kind": "openai", "base_url": dead_upstream, "timeout_s": 5}}))
    if database_url:
        env["AFINA_DATABASE_URL"] = database_url
    return env


def start(env: dict[str, str], log: Path) -> Process:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "afina.gateway.app:create_app",
                                    "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                                   env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 120, f"gateway on port {port} ({log})", process)
    return Process(process, url)


@pytest.fixture(params=["sqlite", "postgres"])
def two_gateways(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict[str, str], Process, Process]]:
    database_url = request.getfixturevalue("postgres_database") if request.param == "postgres" else None
    env = gateway_env(tmp_path / "home", database_url)
    first = start(env, tmp_path / "first.log")
    try:
        second = start(env, tmp_path / "second.log")
    except BaseException:
        stop_process(first.process)
        raise
    yield env, first, second
    stop_process(second.process)
    stop_process(first.process)


def afina(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", "import sys; from afina.cli.main import main; sys.exit(main())",
                           *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def status(gateway: Process, key: str, path: str = "/v1/models") -> int:
    return httpx.get(f"{gateway.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def chat(gateway: Process, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})


def test_a_revoked_key_is_refused_by_the_next_request_on_every_gateway_process(
        two_gateways: tuple[dict[str, str], Process, Process]) -> None:
    env, first, second = two_gateways
    key, other = afina(env, "keys", "create", "--tenant", "acme"), afina(env, "keys", "create", "--tenant", "acme")
    for _ in range(3):  # both processes now hold both keys' grants
        assert [status(first, key), status(second, key), status(first, other), status(second, other)] == [200] * 4
    afina(env, "keys", "revoke", key[:10])
    assert status(first, key) == 401 and status(second, key) == 401  # at once, in both
    assert status(first, other) == 200 and status(second, other) == 200  # the other key still works


def test_a_route_written_through_one_process_is_served_at_once_by_the_other(
        two_gateways: tuple[dict[str, str], Process, Process]) -> None:
    _env, first, second = two_gateways
    key = afina(_env, "keys", "create", "--tenant", "acme")
    headers = {"Authorization": f"Bearer {key}"}
    assert chat(second, key, "aeon").status_code == 404  # remembered as "no such name" by the second
    assert chat(second, key, "aeon").json()["error"]["code"] == "model_not_found"
    created = httpx.put(f"{first.url}/v1/routes/aeon", headers=headers, timeout=30,
                        json={"targets": [{"model": "m", "upstream": "cloud"}]})
    assert created.status_code == 200, created.text
    assert chat(second, key, "aeon").status_code == 502  # the route now: its upstream is down
    assert httpx.delete(f"{first.url}/v1/routes/aeon", headers=headers, timeout=30).status_code == 200
    assert chat(second, key, "aeon").status_code == 404


def test_on_postgres_concurrent_requests_share_reads_of_the_counter_yet_each_sees_earlier_commits(
        postgres_database: str) -> None:
    """Fifty requests at once cost a read or two, not fifty round trips; a read never predates its request."""
    import asyncio

    from afina.core.db import Database, migrate
    from afina.core.db import repository as repo
    from afina.gateway.registry.generation import PostgresGeneration, open_generation_reader

    database = Database(postgres_database)
    migrate(database)
    reader = open_generation_reader(postgres_database)
    assert isinstance(reader, PostgresGeneration)

    async def scenario() -> None:
        values = await asyncio.gather(*(reader.current() for _ in range(50)))
        assert len(set(values)) == 1 and values[0] is not None
        assert reader._started <= 2
        for _ in range(3):
            with database.session() as session:
                repo.create_api_key(session, "acme")
            assert await reader.current() == values[0] + 1
            values[0] += 1
        await reader.close()

    try:
        asyncio.run(scenario())
    finally:
        database.dispose()
