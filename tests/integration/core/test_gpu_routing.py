"""A train stage goes to its GPU class's queue, a trainer consumes the queues its settings name, and a job that
does not fit its GPU moves to a larger class once, without an attempt counted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from afina.core.db import repository as repo
from afina.core.db.models import JobEvent, OutboxMessage
from afina.core.gpu_classes import NeedsLargerGpu
from afina.core.queue import outbox
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.integration.core.test_worker import wait_for_status
from tests.support.jobs import create_job
from tests.support.servers import stop_process

pytestmark = pytest.mark.integration
CLASSES = {"l4": 24, "a100-80gb": 80}


def queued(runtime: Runtime, job_id: str) -> list[str]:
    with runtime.db.session() as session:
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.subject_id == job_id)
                               .order_by(OutboxMessage.id))
        return [row.queue for row in rows]


def test_the_train_stage_is_queued_on_the_jobs_class_and_gpu_count(afina_home: Path) -> None:
    runtime = Runtime(Settings(home=afina_home, log_json=False, gpu_classes=CLASSES))
    plain = create_job(runtime, "acme", "file-x", stage="ingest")
    placed = create_job(runtime, "acme", "file-x", stage="ingest")
    with runtime.db.session() as session:
        job = repo.get_job(session, None, placed.id, for_update=True)
        job.gpu_class, job.num_gpus = "a100-80gb", 2
    with runtime.db.session() as session:
        outbox.add_stage(session, "train", plain.id)
        outbox.add_stage(session, "train", placed.id)
        outbox.add_stage(session, "export", placed.id)  # other stages keep their own queue
    assert queued(runtime, plain.id) == ["train"]
    assert queued(runtime, placed.id) == ["train.a100-80gb.x2", "export"]


def test_a_job_too_big_for_its_gpu_moves_to_the_larger_class_without_counting_an_attempt(afina_home: Path) -> None:
    runtime = Runtime(Settings(home=afina_home, log_json=False, gpu_classes=CLASSES))
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")

    def too_big(_context: object) -> str:
        raise NeedsLargerGpu("a100-80gb", "This job needs about 30.0 GiB of GPU memory and this worker's GPU has "
                                          "20.0 GiB free: moved to GPU class 'a100-80gb' (80 GiB)")

    assert run_stage(runtime, job.id, "train", too_big) == "rerouted"
    with runtime.db.session() as session:
        row = repo.get_job(session, None, job.id)
        events = list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job.id)))
        assert (row.gpu_class, row.status, row.stage, row.attempts, row.lease_owner) == (
            "a100-80gb", "running", "train", 0, None)
    assert any("moved to GPU class 'a100-80gb'" in message for message in events)
    assert queued(runtime, job.id) == ["train.a100-80gb"]
    # the next attempt, on the larger GPU, runs the stage (a recovery requeues it there too)
    ran: list[str] = []
    assert run_stage(runtime, job.id, "train", lambda context: ran.append(context.owner) and None) == "done"
    with runtime.db.session() as session:
        assert len(ran) == 1 and repo.get_job(session, None, job.id).attempts == 1


def test_a_class_trainer_consumes_its_class_queue(
        afina_home: Path, redis_url: str, tmp_path: Path) -> None:
    """A real Celery trainer started with only ``-Q train``: its settings add ``train.a100-80gb``, where the job's
    message waits."""
    broker = f"{redis_url}/{random.randint(1, 15)}"
    env = {**os.environ, "AFINA_HOME": str(afina_home), "AFINA_WORKER_SERVICES": "trainer", "AFINA_LOG_JSON": "false",
           "AFINA_BROKER_URL": broker, "AFINA_GPU_CLASSES": json.dumps(CLASSES), "AFINA_GPU_CLASS": "a100-80gb",
           "AFINA_WORKER_PRELOAD": "false", "AFINA_TRAINER_DEVICE": "cpu"}
    runtime = Runtime(Settings(home=afina_home, broker_url=broker, log_json=False, gpu_classes=CLASSES))
    runtime.celery.connection_for_write().default_channel.client.flushdb()
    job = create_job(runtime, "acme", "file-x", stage="train", status="running")
    with runtime.db.session() as session:
        repo.get_job(session, None, job.id, for_update=True).gpu_class = "a100-80gb"
        message = outbox.add_stage(session, "train", job.id)
    assert message.queue == "train.a100-80gb"
    outbox.deliver(runtime, [message])
    log_path = tmp_path / "trainer.log"
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "afina.core.queue.worker", "worker", "-Q", "train",
                               "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                              env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the job has no dataset: the stage fails at once, which proves the message was taken from the class queue
        assert wait_for_status(runtime, job.id, {"failed"}, 120, log_path) == "failed"
    finally:
        stop_process(worker)
    assert "train.a100-80gb" in log_path.read_text()  # Celery lists the queues it consumes at start
