"""Fixtures shared by every test: settings on temp dirs, and the real servers tests need; the layout rule.

The rule (tests/support/markers.py): tests/unit/ is fast and needs no server, everything under
tests/integration/ and tests/e2e/ is marked ``integration`` (e2e also ``e2e``), and a test not marked
``integration`` cannot open a TCP connection. ``make test-fast`` deselects slow, integration and e2e.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from afina.deploy.processes import stop
from tests.support.markers import apply_area_markers, tcp_blocked
from tests.support.servers import SeaweedS3, ensure_redis, fresh_postgres_database, postgres_url, start_seaweedfs

# no test may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers this adds
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    apply_area_markers(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Setup, call and teardown of a test not marked integration run with TCP connections refused."""
    if item.get_closest_marker("integration") is not None:
        return (yield)
    with tcp_blocked(item.nodeid):
        return (yield)


# the server fixtures (a new one goes into SERVER_FIXTURES of tests/support/markers.py too, which keeps
# tests/unit/ from asking for them)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    stop(server.process.pid)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return ensure_redis()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    return postgres_url("test")


@pytest.fixture
def postgres_database(postgres_admin_url: str) -> Iterator[str]:
    """A brand-new PostgreSQL database for one test, dropped afterwards."""
    with fresh_postgres_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
def afina_home(tmp_path: Path) -> Path:
    home = tmp_path / "afina-home"
    home.mkdir()
    return home


@pytest.fixture
def embedded_settings(afina_home: Path):  # noqa: ANN201
    from afina.core.settings import Settings

    return Settings(home=afina_home, log_json=False)


@pytest.fixture
def bucket_name() -> str:
    return f"afina-test-{secrets.token_hex(4)}"
