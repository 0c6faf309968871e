"""The gateway's in-memory registry rows: served from memory while the generation counter stands still, dropped
the moment any writer moves it (a revoked key, a new route, a registered model), never refilled with a row read
while the registry changed, and never used when the counter cannot be read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from afina.core.db import Database, migrate
from afina.core.db import repository as repo
from afina.core.errors import AuthenticationFailed
from afina.core.routing import RouteSpec, RouteTarget
from afina.gateway.registry.cache import RegistryCache
from afina.gateway.registry.generation import SqliteGeneration, Unreadable, open_generation_reader

T = TypeVar("T")


def run(scenario: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, timeout=30))


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'afina.db'}")
    migrate(db)
    yield db
    db.dispose()


def cache_for(database: Database) -> RegistryCache:
    return RegistryCache(lambda: database, open_generation_reader(database.url))


def new_key(database: Database, tenant: str = "acme", **options: object) -> str:
    with database.session() as session:
        return repo.create_api_key(session, tenant, **options)


def test_the_sqlite_reader_is_chosen_for_a_file_and_none_for_memory(database: Database) -> None:
    assert isinstance(open_generation_reader(database.url), SqliteGeneration)
    assert isinstance(open_generation_reader("sqlite:///:memory:"), Unreadable)


def test_a_key_is_read_once_then_from_memory_and_a_revocation_is_seen_by_the_next_request(
        database: Database) -> None:
    key = new_key(database)
    cache = cache_for(database)

    async def scenario() -> None:
        for _ in range(5):
            assert (await cache.grant(key)).tenant_id == "acme"
        assert cache.lookups == 1
        with database.session() as session:  # another writer: the CLI, another gateway
            repo.revoke_api_key(session, key[:10])
        with pytest.raises(AuthenticationFailed):
            await cache.grant(key)
        await cache.close()

    run(scenario())


def test_any_registry_write_drops_what_memory_holds(database: Database) -> None:
    key = new_key(database)
    cache = cache_for(database)

    async def scenario() -> None:
        await cache.grant(key)
        assert (await cache.name("acme", "alias")).route is None
        before = cache.lookups
        await cache.grant(key)
        await cache.name("acme", "alias")
        assert cache.lookups == before  # both from memory
        with database.session() as session:
            spec = RouteSpec(targets=[RouteTarget(model="m", upstream="up")])
            repo.put_route(session, "acme", "alias", spec.to_row())
        entry = await cache.name("acme", "alias")  # the new route, not the remembered absence of one
        assert entry.route is not None and entry.route.targets[0].model == "m"
        await cache.grant(key)
        assert cache.lookups == before + 2
        await cache.close()

    run(scenario())


def test_an_expired_key_held_in_memory_is_refused_when_its_time_comes(database: Database) -> None:
    import time

    key = new_key(database, expires_at=int(time.time()) + 3600)
    now = [time.time()]
    cache = RegistryCache(lambda: database, open_generation_reader(database.url), clock=lambda: now[0])

    async def scenario() -> None:
        await cache.grant(key)
        now[0] += 7200  # no write happened: only the clock moved
        with pytest.raises(AuthenticationFailed, match="incorrect API key"):
            await cache.grant(key)
        assert cache.lookups == 1
        await cache.close()

    run(scenario())


def test_a_row_read_while_the_registry_changed_is_not_kept(database: Database) -> None:
    """The counter moved between the read of the counter and the read of the row: the row answers this request
    but is not kept under the newer counter it was not read at."""
    key = new_key(database)
    cache = cache_for(database)
    original = cache._load_grant

    def load_then_write(api_key: str):  # noqa: ANN202
        grant = original(api_key)
        with database.session() as session:
            repo.create_api_key(session, "globex")  # a write lands while this request is between its two reads
        return grant

    async def scenario() -> None:
        cache._load_grant = load_then_write  # type: ignore[method-assign]
        await cache.grant(key)
        cache._load_grant = original  # type: ignore[method-assign]
        await cache.grant(key)
        await cache.grant(key)
        assert cache.lookups == 2  # the first read was not kept; the second was
        await cache.close()

    run(scenario())


def test_when_the_counter_cannot_be_read_every_lookup_goes_to_the_database(database: Database) -> None:
    key = new_key(database)
    cache = RegistryCache(lambda: database, Unreadable())

    async def scenario() -> None:
        for _ in range(3):
            await cache.grant(key)
            await cache.name("acme", "nothing")
        assert cache.lookups == 6

    run(scenario())


def test_unknown_keys_are_not_kept_and_names_are_bounded(database: Database) -> None:
    cache = RegistryCache(lambda: database, open_generation_reader(database.url), max_entries=3)

    async def scenario() -> None:
        for attempt in range(2):
            with pytest.raises(AuthenticationFailed):
                await cache.grant(f"afk-guess-{attempt}")
        assert cache._keys == {}
        for index in range(10):
            await cache.name("acme", f"name-{index}")
        assert len(cache._names) == 3 and ("acme", "name-9") in cache._names
        await cache.close()

    run(scenario())


def test_every_write_to_keys_models_and_routes_moves_the_counter_and_a_dropped_trigger_comes_back(
        database: Database) -> None:
    from sqlalchemy import text

    def generation() -> int:
        with database.session() as session:
            return repo.registry_generation(session)

    seen = [generation()]
    key = new_key(database)
    seen.append(generation())
    with database.session() as session:
        repo.revoke_api_key(session, key[:10])
    seen.append(generation())
    with database.session() as session:
        repo.register_model(session, name="ft:m:acme:x:1", tenant_id="acme", base_model="m", job_id="ftjob-1",
                            artifacts={})
    seen.append(generation())
    with database.session() as session:
        session.execute(text("UPDATE models SET artifacts = '{}' WHERE name = 'ft:m:acme:x:1'"))  # raw SQL too
    seen.append(generation())
    with database.session() as session:
        repo.put_route(session, "acme", "r", RouteSpec(targets=[RouteTarget(model="m", upstream="u")]).to_row())
    seen.append(generation())
    with database.session() as session:
        repo.delete_route(session, "acme", "r")
    seen.append(generation())
    assert seen == sorted(set(seen)) and len(seen) == 7  # each write moved it
    # a migration that rebuilds a table on SQLite drops its triggers: the next start installs them again
    with database.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER afina_generation_api_keys_insert"))
    new_key(database)
    assert generation() == seen[-1]
    migrate(database)
    new_key(database)
    assert generation() == seen[-1] + 1
