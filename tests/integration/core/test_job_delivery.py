"""No job is stranded between a commit and its queue message (the transactional outbox).

Each test breaks delivery for real: a gateway process dies right after the commit, the
broker (a Redis server of the test's own) stops right at a stage handoff, a recovered
job's broker is down. The job's message still reaches a worker, exactly once per state.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from sqlalchemy import select

from afina.core.db import repository as repo
from afina.core.db.models import OutboxMessage
from afina.core.queue import outbox
from afina.core.queue.jobs import recover_stale_jobs, run_stage
from afina.core.queue.names import QUEUE_TRAIN, TASK_PREPARE_DATASET, TASK_TRAIN
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.ingest.prepare import prepare_dataset
from tests.integration.core.test_worker import start_worker, wait_for_status
from tests.support.jobs import create_job, sample_examples, upload_file
from tests.support.models import shared_model_cache
from tests.support.servers import PrivateRedis, start_private_redis, stop_process

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[3]


def jsonl(records: list) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def outbox_rows(runtime: Runtime, subject_id: str) -> list[OutboxMessage]:
    with runtime.db.session() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.subject_id == subject_id)
                                    .order_by(OutboxMessage.id)))


def job_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def queued_tasks(broker: PrivateRedis, queue: str) -> list[tuple[str, list]]:
    """The (task name, args) of every message waiting in a Celery queue on Redis."""
    client = redis.Redis.from_url(broker.url)
    messages = [orjson.loads(raw) for raw in client.lrange(queue, 0, -1)]
    return [(m["headers"]["task"], orjson.loads(__import__("base64").b64decode(m["body"]))[0]) for m in messages]


@pytest.fixture
def private_redis(tmp_path: Path):  # noqa: ANN201
    server = start_private_redis(tmp_path / "redis")
    yield server
    server.stop()


def test_a_gateway_killed_after_the_commit_still_gets_its_job_ingested_once(afina_home: Path,
                                                                            tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=afina_home, log_json=False))
    upload = upload_file(runtime, "acme", jsonl(sample_examples(15)))
    died = subprocess.run([sys.executable, "-m", "tests.integration.core.die_after_commit", str(afina_home), "acme",
                           upload.id], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AFINA_HOME": str(afina_home)})
    assert died.returncode == 137, died.stdout + died.stderr
    with runtime.db.session() as session:
        [job] = repo.list_jobs(session, "acme", None, 10)[0]
    job_id = job.id
    [message] = outbox_rows(runtime, job_id)
    assert message.task == TASK_PREPARE_DATASET and message.sent_at is None  # committed, never sent

    log_path = tmp_path / "worker.log"
    worker = start_worker({**os.environ, "AFINA_HOME": str(afina_home), "AFINA_WORKER_SERVICES": "ingest",
                           "AFINA_LOG_JSON": "false", "AFINA_OUTBOX_RELAY_INTERVAL_S": "0.5"}, log_path)
    try:
        # the worker's relay sends the message the dead gateway left; the ingest stage runs
        assert wait_for_status(runtime, job_id, {"queued", "failed"}, 90, log_path) == "queued"
        deadline = time.monotonic() + 30
        while job_row(runtime, job_id).lease_owner is not None:  # the handoff commits after the status
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        stop_process(worker)
    rows = outbox_rows(runtime, job_id)
    assert [(row.task, row.sent_at is not None) for row in rows] == [(TASK_PREPARE_DATASET, True), (TASK_TRAIN, True)]
    with runtime.db.session() as session:
        messages = [e.message for e in repo.list_events(session, job_id, None, 100)[0]]
    assert messages.count("Files validated; job queued for training") == 1


@pytest.mark.slow
def test_a_worker_killed_after_the_handoff_commit_still_gets_its_job_to_succeeded_once(
        afina_home: Path, private_redis: PrivateRedis, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingest stage finishes and its worker dies right after committing the handoff to train, before the
    train message is sent: the relay sends it once, the job trains, exports and succeeds, once."""
    from afina.core.training import FineTuningRequest
    from afina.exporter.pipeline import export_job
    from afina.gateway.fine_tuning.service import create_job as create_job_via_api
    from afina.trainer.recipe import train_job

    model_cache = shared_model_cache(tmp_path_factory)
    runtime = Runtime(Settings(home=afina_home, log_json=False, broker_url=private_redis.url,
                               model_cache_dir=model_cache, export_quantizations=["Q8_0"]))
    upload = upload_file(runtime, "acme", jsonl(sample_examples(15)))
    job_id = create_job_via_api(runtime, "acme", FineTuningRequest(
        model="smollm2-135m-instruct", training_file=upload.id, suffix="handoff",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "max_steps": 2, "batch_size": 2, "max_seq_len": 256, "save_steps": 2}}})).id

    died = subprocess.run([sys.executable, "-m", "tests.integration.core.die_after_commit", "handoff",
                           str(afina_home), job_id], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AFINA_HOME": str(afina_home), "AFINA_BROKER_URL": private_redis.url,
                               "AFINA_MODEL_CACHE_DIR": str(model_cache)})
    assert died.returncode == 137, died.stdout + died.stderr
    row = job_row(runtime, job_id)
    assert (row.status, row.stage, row.lease_owner, row.error) == ("queued", "train", None, None)
    [train_message] = [m for m in outbox_rows(runtime, job_id) if m.task == TASK_TRAIN]
    assert train_message.sent_at is None  # committed with the handoff, never sent
    assert queued_tasks(private_redis, QUEUE_TRAIN) == []

    monkeypatch.setattr(outbox, "SENDER_GRACE_S", 0.0)
    assert outbox.relay_pending(runtime) == 1  # the relay of any worker sends what the dead one left
    assert outbox.relay_pending(runtime) == 0
    assert queued_tasks(private_redis, QUEUE_TRAIN) == [(TASK_TRAIN, [job_id])]

    # the worker that takes the message runs train, then export; a redelivered train message changes nothing
    assert run_stage(runtime, job_id, "train", train_job) == "done"
    assert run_stage(runtime, job_id, "export", export_job) == "done"
    assert run_stage(runtime, job_id, "train", train_job) == "skipped"
    row = job_row(runtime, job_id)
    assert (row.status, row.error) == ("succeeded", None) and row.fine_tuned_model
    with runtime.db.session() as session:
        assert repo.count_models_for_job(session, job_id) == 1
        messages = [e.message for e in repo.list_events(session, job_id, None, 200)[0]]
    assert messages.count("Files validated; job queued for training") == 1
    assert sum(m.startswith("Adapter saved (") for m in messages) == 1
    assert sum("is ready (serving" in m for m in messages) == 1
    assert [m.task for m in outbox_rows(runtime, job_id)].count(TASK_TRAIN) == 1


def test_a_broker_down_at_the_handoff_keeps_the_finished_stage_and_sends_later(
        afina_home: Path, private_redis: PrivateRedis, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = Runtime(Settings(home=afina_home, log_json=False, broker_url=private_redis.url,
                               model_cache_dir=shared_model_cache(tmp_path_factory)))
    upload = upload_file(runtime, "acme", jsonl(sample_examples(15)))
    job = create_job(runtime, "acme", upload.id)

    def ingest_then_lose_the_broker(context):  # noqa: ANN001, ANN202
        next_stage = prepare_dataset(context)
        private_redis.stop()  # the broker goes away between the finished work and its handoff
        return next_stage

    assert run_stage(runtime, job.id, "ingest", ingest_then_lose_the_broker) == "done"
    row = job_row(runtime, job.id)
    assert (row.status, row.stage, row.lease_owner, row.error) == ("queued", "train", None, None)
    [train_message] = [m for m in outbox_rows(runtime, job.id) if m.task == TASK_TRAIN]
    assert train_message.sent_at is None and train_message.send_attempts == 1

    private_redis.start()  # same port, same AOF folder
    monkeypatch.setattr(outbox, "SENDER_GRACE_S", 0.0)
    deadline = time.monotonic() + 30
    while outbox.relay_pending(runtime) == 0:  # the failed send backs off for a second or so first
        assert time.monotonic() < deadline, "the relay never sent the train message"
        time.sleep(0.5)
    assert queued_tasks(private_redis, QUEUE_TRAIN) == [(TASK_TRAIN, [job.id])]
    assert outbox.relay_pending(runtime) == 0  # sent once: nothing is left to send again
    assert queued_tasks(private_redis, QUEUE_TRAIN) == [(TASK_TRAIN, [job.id])]


def test_a_recovered_job_is_requeued_even_when_the_broker_is_down(afina_home: Path,
                                                                  private_redis: PrivateRedis,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = Runtime(Settings(home=afina_home, log_json=False, broker_url=private_redis.url))
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    with runtime.db.session() as session:
        assert repo.acquire_lease(session, job.id, "dead-worker", 60)
        session.get(type(job), job.id).lease_expires_at = time.time() - 5
    private_redis.stop()
    assert recover_stale_jobs(runtime) == [job.id]  # recorded, though nothing could be sent
    assert job_row(runtime, job.id).lease_owner is None
    [message] = outbox_rows(runtime, job.id)
    assert message.task == TASK_TRAIN and message.sent_at is None

    private_redis.start()
    monkeypatch.setattr(outbox, "SENDER_GRACE_S", 0.0)
    deadline = time.monotonic() + 30
    while outbox.relay_pending(runtime) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert queued_tasks(private_redis, QUEUE_TRAIN) == [(TASK_TRAIN, [job.id])]


def test_an_active_job_no_message_will_start_is_requeued_once_per_period(afina_home: Path) -> None:
    runtime = Runtime(Settings(home=afina_home, log_json=False, orphan_requeue_s=0))
    orphan = create_job(runtime, "acme", "file-x", stage="train", status="queued")  # no lease, no message
    time.sleep(1.1)  # created_at is in whole seconds
    assert recover_stale_jobs(runtime) == [orphan.id]
    [message] = outbox_rows(runtime, orphan.id)
    assert message.task == TASK_TRAIN and message.sent_at is not None
    runtime.settings.orphan_requeue_s = 3600  # its message just went out: not an orphan for the next hour
    assert recover_stale_jobs(runtime) == []
    assert len(outbox_rows(runtime, orphan.id)) == 1
