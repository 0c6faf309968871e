"""A real Celery worker process takes the ingest stage off the broker: filesystem (embedded) and Redis."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from afina.core.db import repository as repo
from afina.core.queue.app import enqueue_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.support.jobs import create_job, sample_examples, upload_file
from tests.support.servers import stop_process

pytestmark = pytest.mark.integration


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "celery", "-A", "afina.core.queue.worker", "worker", "-Q", "ingest",
               "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    return subprocess.Popen(command, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_status(runtime: Runtime, job_id: str, statuses: set[str], timeout: float, log_path: Path) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with runtime.db.session() as session:
            status = repo.get_job(session, None, job_id).status
        if status in statuses:
            return status
        time.sleep(0.3)
    raise AssertionError(f"job stayed {status}; worker log:\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("broker", ["filesystem", "redis"])
def test_worker_runs_the_ingest_stage(broker: str, afina_home: Path, redis_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "AFINA_HOME": str(afina_home), "AFINA_WORKER_SERVICES": "ingest", "AFINA_LOG_JSON": "false"}
    redis_db = None
    if broker == "redis":
        redis_db = random.randint(1, 15)
        env["AFINA_BROKER_URL"] = f"{redis_url}/{redis_db}"
    settings = Settings(home=afina_home, broker_url=env.get("AFINA_BROKER_URL"))
    runtime = Runtime(settings)
    upload = upload_file(runtime, "acme", b"".join(orjson.dumps(r) + b"\n" for r in sample_examples(15)))
    job = create_job(runtime, "acme", upload.id)
    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path)
    try:
        enqueue_stage(runtime.celery, "ingest", job.id)
        assert wait_for_status(runtime, job.id, {"queued", "failed"}, 60, log_path) == "queued"
    finally:
        stop_process(worker)
        if redis_db is not None:
            import redis

            redis.Redis.from_url(f"{redis_url}/{redis_db}").flushdb()
