"""The shared Prometheus helpers against the real ``prometheus_client`` default registry, and the send-time stamp
that queue wait is measured from."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from celery.app.task import Context
from prometheus_client import REGISTRY

from afina.core.metrics import metrics_registry, observe_queue_wait, render_latest, set_job_phase
from afina.core.queue.app import SENT_AT_HEADER, enqueue_stage, message_sent_at
from afina.core.runtime import Runtime
from afina.core.settings import Settings


def phase(name: str) -> float | None:
    return REGISTRY.get_sample_value("afina_job_phase", {"phase": name})


def test_one_phase_at_a_time() -> None:
    set_job_phase("train")
    assert (phase("train"), phase("idle"), phase("ingest"), phase("export")) == (1, 0, 0, 0)
    set_job_phase("idle")
    assert (phase("train"), phase("idle")) == (0, 1)
    set_job_phase("distill")  # a stage added later is shown, never an error that would fail a job
    assert (phase("distill"), phase("idle")) == (1, 0)
    set_job_phase("idle")
    assert phase("distill") == 0


def test_queue_wait_is_observed_from_the_send_time() -> None:
    count = lambda: REGISTRY.get_sample_value("afina_queue_wait_seconds_count", {"stage": "export"}) or 0  # noqa: E731
    total = lambda: REGISTRY.get_sample_value("afina_queue_wait_seconds_sum", {"stage": "export"}) or 0  # noqa: E731
    before_count, before_sum = count(), total()
    observe_queue_wait("export", sent_at=100.0, started_at=112.5)
    observe_queue_wait("export", sent_at=None, started_at=112.5)  # a message from an older gateway: not counted
    observe_queue_wait("export", sent_at=200.0, started_at=199.0)  # clocks apart: never negative
    assert count() - before_count == 2 and total() - before_sum == 12.5


def test_enqueue_stamps_the_send_time_and_the_worker_reads_it(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False))
    before = time.time()
    enqueue_stage(runtime.celery, "train", "ftjob-0123456789abcdef01234567")
    [message] = list((runtime.settings.broker_folder / "queue").glob("*"))
    envelope = json.loads(message.read_text())
    stamped = envelope["headers"][SENT_AT_HEADER]
    assert before <= stamped <= time.time()
    assert json.loads(base64.b64decode(envelope["body"]))[0] == ["ftjob-0123456789abcdef01234567"]
    # what a worker sees: the message headers as attributes of ``task.request``
    assert message_sent_at(Context({**envelope["headers"]})) == stamped
    assert message_sent_at(Context({})) is None
    assert message_sent_at(Context({SENT_AT_HEADER: "not a time"})) is None


def test_without_a_multiprocess_folder_the_default_registry_is_exposed(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert metrics_registry() is REGISTRY
    set_job_phase("export")
    body, content_type = render_latest()
    assert content_type.startswith("text/plain") and b'afina_job_phase{phase="export"} 1.0' in body
    set_job_phase("idle")
