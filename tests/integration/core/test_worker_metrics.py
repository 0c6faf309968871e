"""A real prefork Celery worker's Prometheus endpoint: values set in the pool child (queue wait, stage time,
phase) are served by the parent, and a SIGKILLed child's live gauges disappear with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from afina.core.queue.app import enqueue_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.integration.core.test_worker import wait_for_status
from tests.support.jobs import create_job, sample_examples, upload_file
from tests.support.servers import free_port, stop_process, wait_until

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def pool_children(worker: subprocess.Popen) -> list[int]:
    return [child.pid for child in psutil.Process(worker.pid).children()]


def test_the_parent_serves_what_the_pool_child_measured(afina_home: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "AFINA_HOME": str(afina_home), "AFINA_WORKER_SERVICES": "ingest", "AFINA_LOG_JSON": "false",
           "AFINA_METRICS_PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker makes its own
    runtime = Runtime(Settings(home=afina_home))
    upload = upload_file(runtime, "acme", b"".join(orjson.dumps(r) + b"\n" for r in sample_examples(15)))
    job = create_job(runtime, "acme", upload.id)
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "afina.core.queue.worker", "worker", "-Q", "ingest",
               "--concurrency", "1", "--pool", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    worker = subprocess.Popen(command, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_until(lambda: _answers(port), 60, "worker metrics endpoint", worker)
        wait_until(lambda: value(scrape(port), "afina_job_phase", phase="idle") == 1, 30, "idle pool child")
        sent = time.time()
        enqueue_stage(runtime.celery, "ingest", job.id)
        assert wait_for_status(runtime, job.id, {"queued", "failed"}, 60, log_path) == "queued"
        waited = time.time() - sent

        def stage_recorded() -> bool:
            return value(scrape(port), "afina_job_stage_seconds_count", stage="ingest", outcome="succeeded") == 1

        wait_until(stage_recorded, 10, "stage metrics")
        samples = scrape(port)
        assert value(samples, "afina_queue_wait_seconds_count", stage="ingest") == 1
        assert 0 <= value(samples, "afina_queue_wait_seconds_sum", stage="ingest") <= waited
        assert value(samples, "afina_job_phase", phase="idle") == 1
        assert value(samples, "afina_job_phase", phase="ingest") == 0

        # the pool child dies hard; the parent starts another. Its counters stay, its live gauges go.
        [child] = pool_children(worker)
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: pool_children(worker) not in ([], [child]), 60, "a new pool child", worker)
        wait_until(lambda: value(scrape(port), "afina_job_phase", phase="idle") == 1, 30, "one idle child")
        samples = scrape(port)
        assert value(samples, "afina_job_phase", phase="idle") == 1  # not 2: the dead child's value is gone
        assert value(samples, "afina_job_stage_seconds_count", stage="ingest", outcome="succeeded") == 1
    except BaseException:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        stop_process(worker)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
