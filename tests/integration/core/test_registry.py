"""The registry on SQLite and on the PostgreSQL server: migrations, tenancy, pagination, leases."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import inspect

from afina.core.db import Database, migrate
from afina.core.db import repository as repo
from afina.core.errors import AuthenticationFailed, Conflict, NotFound
from tests.support.jobs import create_job

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path) -> Iterator[Database]:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'registry.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_database")
    db = Database(url)
    migrate(db)
    yield db
    db.dispose()


class _Runtime:
    """Enough of a Runtime for tests.support.jobs.create_job."""

    def __init__(self, db: Database) -> None:
        self.db = db


def test_migrations_create_every_table_and_are_repeatable(database: Database) -> None:
    migrate(database)  # a second run is a no-op
    tables = set(inspect(database.engine).get_table_names())
    assert {"tenants", "api_keys", "files", "jobs", "job_events", "checkpoints", "models",
            "alembic_version"} <= tables


def test_api_keys_are_stored_hashed_and_authenticate(database: Database) -> None:
    with database.session() as session:
        key = repo.create_api_key(session, "acme")
    with database.session() as session:
        assert repo.authenticate(session, key) == "acme"
        from afina.core.db.models import ApiKey

        stored = [row.key_hash for row in session.query(ApiKey)]
        assert key not in stored and repo.hash_api_key(key) in stored
        with pytest.raises(AuthenticationFailed):
            repo.authenticate(session, key + "x")
        with pytest.raises(AuthenticationFailed):
            repo.authenticate(session, None)


def test_jobs_are_tenant_scoped_and_paginate_newest_first(database: Database) -> None:
    runtime = _Runtime(database)
    created = [create_job(runtime, "acme", "file-x") for _ in range(5)]
    other = create_job(runtime, "globex", "file-y")
    with database.session() as session:
        page, has_more = repo.list_jobs(session, "acme", None, 2)
        assert has_more and len(page) == 2
        seen = [job.id for job in page]
        while has_more:
            page, has_more = repo.list_jobs(session, "acme", seen[-1], 2)
            seen += [job.id for job in page]
        assert sorted(seen) == sorted(job.id for job in created)
        assert len(set(seen)) == 5
        with pytest.raises(NotFound):
            repo.get_job(session, "acme", other.id)


def test_events_list_newest_first_with_cursor(database: Database) -> None:
    job = create_job(_Runtime(database), "acme", "file-x")
    with database.session() as session:
        for i in range(4):
            repo.add_event(session, job.id, f"event {i}")
    with database.session() as session:
        first, more = repo.list_events(session, job.id, None, 2)
        assert [e.message for e in first] == ["event 3", "event 2"] and more
        rest, more = repo.list_events(session, job.id, first[-1].id, 10)
        assert [e.message for e in rest] == ["event 1", "event 0"] and not more


def test_lease_is_exclusive_until_it_expires(database: Database) -> None:
    job = create_job(_Runtime(database), "acme", "file-x")
    with database.session() as session:
        assert repo.acquire_lease(session, job.id, "worker-a", ttl_s=0.5)
    with database.session() as session:
        assert not repo.acquire_lease(session, job.id, "worker-b", ttl_s=30)
        assert repo.renew_lease(session, job.id, "worker-a", ttl_s=0.5)
        assert not repo.renew_lease(session, job.id, "worker-b", ttl_s=0.5)
    time.sleep(0.7)
    with database.session() as session:
        stale = repo.claim_stale_jobs(session)
        assert [j.id for j in stale] == [job.id]
    with database.session() as session:
        assert repo.claim_stale_jobs(session) == []  # claimed once only
        assert repo.acquire_lease(session, job.id, "worker-b", ttl_s=30)
        assert not repo.renew_lease(session, job.id, "worker-a", ttl_s=30)  # the old holder lost it


def test_cancel_without_a_live_lease_is_immediate_and_terminal_is_final(database: Database) -> None:
    job = create_job(_Runtime(database), "acme", "file-x")
    with database.session() as session:
        cancelled = repo.request_cancel(session, "acme", job.id)
        assert cancelled.status == "cancelled" and cancelled.finished_at
    with database.session() as session:
        with pytest.raises(Conflict):
            repo.request_cancel(session, "acme", job.id)


def test_cancel_with_a_live_lease_is_cooperative(database: Database) -> None:
    job = create_job(_Runtime(database), "acme", "file-x", status="running", stage="train")
    with database.session() as session:
        repo.acquire_lease(session, job.id, "worker-a", ttl_s=30)
    with database.session() as session:
        pending = repo.request_cancel(session, "acme", job.id)
        assert pending.status == "running" and pending.cancel_requested


def test_one_model_per_job(database: Database) -> None:
    job = create_job(_Runtime(database), "acme", "file-x")
    with database.session() as session:
        repo.register_model(session, name="ft:a:acme::1", tenant_id="acme", base_model="a", job_id=job.id,
                            artifacts={"v": 1})
    with database.session() as session:
        repo.register_model(session, name="ft:a:acme::1", tenant_id="acme", base_model="a", job_id=job.id,
                            artifacts={"v": 2})
    with database.session() as session:
        assert repo.count_models_for_job(session, job.id) == 1
        assert repo.get_model(session, "acme", "ft:a:acme::1").artifacts == {"v": 2}
        assert repo.get_model(session, "globex", "ft:a:acme::1") is None
