"""Stage faults that must neither strand a job, nor fail it for the infrastructure's sake, nor run it forever.

Real faults where they can be made: PostgreSQL refusing connections (``ALLOW_CONNECTIONS
false`` and its backends terminated), an S3 endpoint that does not answer, worker processes
that die mid-stage, Celery's soft time limit in a real worker.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import create_engine, select, text

from afina.core.db import repository as repo
from afina.core.db.models import Job, OutboxMessage
from afina.core.errors import LeaseLost, StoreUnavailable
from afina.core.queue.app import create_celery_app
from afina.core.queue.drain import WorkerDraining
from afina.core.queue.jobs import recover_stale_jobs, run_stage
from afina.core.queue.names import TASK_TRAIN
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.core.store.s3 import S3Store
from tests.integration.core.test_worker import start_worker, wait_for_status
from tests.support.jobs import context_for, create_job, sample_examples, upload_file
from tests.support.servers import free_port, stop_process

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[3]


def job_row(runtime: Runtime, job_id: str) -> Job:
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def set_columns(runtime: Runtime, job_id: str, **values: object) -> None:
    with runtime.db.session() as session:
        job = repo.get_job(session, None, job_id, for_update=True)
        for name, value in values.items():
            setattr(job, name, value)


def outbox_rows(runtime: Runtime, job_id: str) -> list[OutboxMessage]:
    with runtime.db.session() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.subject_id == job_id)))


def must_not_run(_context: object) -> str:
    raise AssertionError("the stage ran")


@pytest.fixture
def runtime(afina_home: Path) -> Runtime:
    return Runtime(Settings(home=afina_home, log_json=False, transient_backoff_s=0.05, transient_retries=2))


# attempts -------------------------------------------------------------------

def test_a_stage_whose_worker_keeps_dying_fails_after_max_attempts(afina_home: Path) -> None:
    """Each attempt is a real process killed mid-stage; the recovery sweep requeues it until the cap."""
    runtime = Runtime(Settings(home=afina_home, log_json=False, max_stage_attempts=2))
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    dying_stage = ("import os, sys; from pathlib import Path; from afina.core.queue.jobs import run_stage;"
                   "from afina.core.runtime import Runtime; from afina.core.settings import Settings;"
                   "runtime = Runtime(Settings(home=Path(sys.argv[1]), log_json=False));"
                   "print(run_stage(runtime, sys.argv[2], 'train', lambda context: os._exit(137)))")
    for attempt in (1, 2):
        died = subprocess.run([sys.executable, "-c", dying_stage, str(afina_home), job.id], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        assert died.returncode == 137, died.stdout + died.stderr
        assert job_row(runtime, job.id).attempts == attempt
        set_columns(runtime, job.id, lease_expires_at=time.time() - 1)
        assert recover_stale_jobs(runtime) == [job.id]
    assert run_stage(runtime, job.id, "train", must_not_run) == "failed"
    row = job_row(runtime, job.id)
    assert row.status == "failed" and row.lease_owner is None
    assert row.error["code"] == "stage_attempts_exhausted"
    assert "started 2 times" in row.error["message"] and "AFINA_MAX_STAGE_ATTEMPTS" in row.error["message"]


def test_a_drained_stage_does_not_use_up_an_attempt(runtime: Runtime) -> None:
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")

    def drain(_context: object) -> str:
        raise WorkerDraining(job.id)

    for _ in range(runtime.settings.max_stage_attempts + 2):
        assert run_stage(runtime, job.id, "train", drain) == "drained"
    row = job_row(runtime, job.id)
    assert (row.status, row.attempts, row.lease_owner) == ("running", 0, None)
    assert len(outbox_rows(runtime, job.id)) == runtime.settings.max_stage_attempts + 2


def test_a_claim_retried_after_its_commit_went_through_counts_one_attempt(runtime: Runtime) -> None:
    """The database may drop the connection after committing a claim; the retried claim (same owner) is the
    same attempt, not a second one burnt by the infrastructure."""
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    for _ in range(3):
        with runtime.db.session() as session:
            assert repo.acquire_lease(session, job.id, "worker-a", 60)
    assert job_row(runtime, job.id).attempts == 1


def test_a_database_fault_while_announcing_a_resume_does_not_use_up_an_attempt(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "Resuming ..." event is written under the same guard as the stage: a database that stays away
    then pauses the job (attempt given back) instead of leaving a held lease to expire and count as a crash."""
    from afina.core.queue.jobs import JobContext

    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    set_columns(runtime, job.id, attempts=1)  # an earlier attempt's worker died: this claim is a resume
    real_event = JobContext.event

    def event(context: JobContext, message: str, **kwargs: object) -> None:
        if message.startswith("Resuming"):
            raise ConnectionError("the database went away")
        real_event(context, message, **kwargs)

    monkeypatch.setattr(JobContext, "event", event)
    assert run_stage(runtime, job.id, "train", must_not_run) == "paused"
    row = job_row(runtime, job.id)
    assert (row.status, row.lease_owner, row.attempts) == ("running", None, 1)
    [message] = outbox_rows(runtime, job.id)
    assert message.task == TASK_TRAIN


def test_a_pause_whose_give_back_first_fails_keeps_trying_and_does_not_use_up_an_attempt(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A give-back that never landed would let the lease expire and the sweep's requeue count the pause as a
    crashed attempt: while the lease is held, the give-back is tried again until it lands."""
    from afina.core.queue import jobs

    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    real_give_back, failures = jobs._give_back, []

    def flaky_give_back(context, **kwargs):  # noqa: ANN001, ANN202
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("the database is still away")
        return real_give_back(context, **kwargs)

    monkeypatch.setattr(jobs, "_give_back", flaky_give_back)

    def store_away(_context: object) -> str:
        raise StoreUnavailable("the object store did not answer (write); try again shortly")

    assert run_stage(runtime, job.id, "train", store_away) == "paused"
    row = job_row(runtime, job.id)
    assert (row.status, row.lease_owner, row.attempts, len(failures)) == ("running", None, 0, 2)
    assert [m.task for m in outbox_rows(runtime, job.id)] == [TASK_TRAIN]


# transient faults -----------------------------------------------------------

@pytest.fixture
def postgres_blocker(postgres_admin_url: str, postgres_database: str) -> Iterator[tuple[object, object]]:
    """``block()`` makes the test database refuse connections (and drops the open ones); ``allow()`` undoes it."""
    name = postgres_database.rsplit("/", 1)[-1]
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")

    def block() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})

    def allow() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))

    yield block, allow
    allow()
    admin.dispose()


def test_a_postgres_blip_in_the_per_step_cancel_check_is_ridden_out(afina_home: Path, postgres_database: str,
                                                                   postgres_blocker: tuple) -> None:
    block, allow = postgres_blocker
    runtime = Runtime(Settings(home=afina_home, log_json=False, database_url=postgres_database,
                               transient_backoff_s=0.25, transient_retries=5))
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    context = context_for(runtime, job, "train")
    assert context.cancel_requested() is False
    block()
    threading.Timer(1.0, allow).start()
    context._cancel_checked_at = -1e9  # noqa: SLF001 - the next step's poll is due now
    assert context.cancel_requested() is False  # answered once PostgreSQL took connections again


def test_the_api_answers_503_with_retry_after_while_postgres_is_away(afina_home: Path, postgres_database: str,
                                                                     postgres_blocker: tuple) -> None:
    from tests.integration.gateway.conftest import make_settings, start_gateway

    block, _allow = postgres_blocker
    gateway = start_gateway(make_settings(afina_home, database_url=postgres_database), tenants=("acme",))
    try:
        headers = {"Authorization": f"Bearer {gateway.keys['acme']}"}
        assert httpx.get(f"{gateway.url}/v1/files", headers=headers, timeout=30).status_code == 200
        block()
        answer = httpx.get(f"{gateway.url}/v1/files", headers=headers, timeout=30)
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "5"
        body = answer.json()["error"]
        assert body["code"] == "service_unavailable" and "error id err_" in body["message"]
        for internal in ("postgres", "5432", "127.0.0.1", "psycopg", "sqlalchemy", postgres_database.rsplit("/")[-1]):
            assert internal not in answer.text.lower()
    finally:
        gateway.served.stop()
        gateway.runtime.db.dispose()


def test_an_s3_endpoint_that_does_not_answer_is_store_unavailable_not_a_urllib3_error() -> None:
    with pytest.raises(StoreUnavailable) as raised:
        S3Store.connect(f"127.0.0.1:{free_port()}", "key", "secret", "afina", retries=1, backoff_s=0.01)
    assert raised.value.http_status == 503 and "127.0.0.1" not in raised.value.message


def test_a_persistent_infrastructure_fault_gives_the_job_back_instead_of_failing_it(runtime: Runtime) -> None:
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")

    def store_away(_context: object) -> str:
        raise StoreUnavailable("the object store did not answer (write); try again shortly")

    assert run_stage(runtime, job.id, "train", store_away) == "paused"
    row = job_row(runtime, job.id)
    assert (row.status, row.stage, row.error, row.lease_owner, row.attempts) == ("running", "train", None, None, 0)
    [message] = outbox_rows(runtime, job.id)
    assert message.task == TASK_TRAIN and message.sent_at is None
    assert message.available_at - message.created_at == pytest.approx(runtime.settings.transient_requeue_delay_s)
    with runtime.db.session() as session:
        events = [e.message for e in repo.list_events(session, job.id, None, 10)[0]]
    assert any("paused" in e for e in events)


# fencing and clocks ---------------------------------------------------------

def test_a_worker_that_lost_its_lease_changes_nothing(runtime: Runtime) -> None:
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")

    def stall_then_finish(context):  # noqa: ANN001, ANN202
        # this worker stalls; its lease expires and another worker takes the job over
        set_columns(runtime, job.id, lease_expires_at=time.time() - 1)
        with runtime.db.session() as session:
            assert repo.acquire_lease(session, job.id, "the-new-owner", 60)
        with pytest.raises(LeaseLost):
            context.record_trained_tokens(123)
        with pytest.raises(LeaseLost):
            context.event("a stale worker's event")
        return "export"

    assert run_stage(runtime, job.id, "train", stall_then_finish) == "lease_lost"
    row = job_row(runtime, job.id)
    assert (row.stage, row.lease_owner, row.trained_tokens) == ("train", "the-new-owner", None)
    assert outbox_rows(runtime, job.id) == []
    with runtime.db.session() as session:
        assert "a stale worker's event" not in [e.message for e in repo.list_events(session, job.id, None, 10)[0]]


def test_leases_are_judged_on_the_database_clock_not_the_hosts(runtime: Runtime,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    with runtime.db.session() as session:
        assert repo.acquire_lease(session, job.id, "worker-a", 60)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 7200)  # this host's clock runs two hours ahead
    with runtime.db.session() as session:
        assert not repo.acquire_lease(session, job.id, "worker-b", 60)  # worker-a's lease is alive
        assert repo.claim_stale_jobs(session) == []
    assert job_row(runtime, job.id).lease_owner == "worker-a"


# what the user sees ---------------------------------------------------------

def test_an_unexpected_fault_gives_the_user_an_error_id_and_the_operator_the_detail(
        runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    leak = "connection to postgresql://afina:canary-pw-81@db.internal:5432/afina failed"

    def crash(_context: object) -> str:
        raise RuntimeError(leak)

    with caplog.at_level(logging.ERROR, logger="afina.jobs"):
        assert run_stage(runtime, job.id, "train", crash) == "failed"
    error = job_row(runtime, job.id).error
    assert error["code"] == "internal_error" and error["error_id"].startswith("err_")
    assert error["error_id"] in error["message"]
    for secret in ("canary-pw-81", "db.internal", "postgresql://", "RuntimeError"):
        assert secret not in error["message"]
    with runtime.db.session() as session:
        assert not any("canary-pw-81" in e.message for e in repo.list_events(session, job.id, None, 10)[0])
    [record] = [r for r in caplog.records if r.getMessage() == "stage.crashed"]
    assert record.fields["error_id"] == error["error_id"] and "RuntimeError" in record.fields["trace"]


def test_a_stage_stopped_by_its_soft_time_limit_fails_saying_which_limit(runtime: Runtime) -> None:
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")

    def too_slow(_context: object) -> str:
        raise SoftTimeLimitExceeded()

    assert run_stage(runtime, job.id, "train", too_slow) == "failed"
    error = job_row(runtime, job.id).error
    assert error["code"] == "stage_time_limit" and "time limit" in error["message"]


def test_every_task_carries_its_stage_time_limits(afina_home: Path) -> None:
    settings = Settings(home=afina_home, task_soft_time_limit_s=1000, task_hard_time_limit_grace_s=60,
                        stage_time_limits_s={"train": 86400})
    annotations = create_celery_app(settings).conf.task_annotations
    assert annotations[TASK_TRAIN] == {"soft_time_limit": 86400, "time_limit": 86460}
    assert {"soft_time_limit": 1000, "time_limit": 1060} in annotations.values()


def test_a_real_worker_enforces_the_soft_time_limit(afina_home: Path, tmp_path: Path) -> None:
    """The ingest stage (a few seconds: it loads a tokenizer) under a 1-second limit, in a prefork worker."""
    env = {**os.environ, "AFINA_HOME": str(afina_home), "AFINA_WORKER_SERVICES": "ingest", "AFINA_LOG_JSON": "false",
           "AFINA_STAGE_TIME_LIMITS_S": '{"ingest": 1}', "AFINA_WORKER_PRELOAD": "false"}
    runtime = Runtime(Settings(home=afina_home, log_json=False))
    upload = upload_file(runtime, "acme", b"".join(orjson.dumps(r) + b"\n" for r in sample_examples(15)))
    job = create_job(runtime, "acme", upload.id)
    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path)
    try:
        from afina.core.queue.app import enqueue_stage

        enqueue_stage(runtime.celery, "ingest", job.id)
        assert wait_for_status(runtime, job.id, {"queued", "failed"}, 90, log_path) == "failed"
    finally:
        stop_process(worker)
    assert job_row(runtime, job.id).error["code"] == "stage_time_limit"
