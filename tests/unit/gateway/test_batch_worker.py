"""The batch worker's pieces: its queue and task, and the checks each input line passes before any model runs."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from afina.core.batches import BATCH_KIND, BatchSpec, batch_id
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.queue.names import SERVICE_QUEUES, SERVICE_TASK_MODULES, STAGE_TASKS, TASK_RUN_BATCH
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.batches.runner import LineRefused, parse_line
from afina.gateway.batches.service import to_batch

CHAT = "/v1/chat/completions"


def test_the_batch_stage_has_its_own_queue_and_service() -> None:
    assert STAGE_TASKS["batch"] == (TASK_RUN_BATCH, "batch")
    assert SERVICE_QUEUES["batcher"] == "batch"
    assert SERVICE_TASK_MODULES["batcher"] == "afina.gateway.batches.tasks"


def test_task_is_registered_and_a_batch_whose_input_is_gone_fails(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False), include_tasks=[SERVICE_TASK_MODULES["batcher"]])
    app = runtime.celery
    app.loader.import_default_modules()
    assert TASK_RUN_BATCH in app.tasks
    with runtime.db.session() as session:
        repo.ensure_tenant(session, "acme")
        job = Job(id=batch_id(), tenant_id="acme", model=CHAT, training_file="file-gone", seed=0, hyperparameters={},
                  kind=BATCH_KIND, stage="batch", status="queued",
                  method=BatchSpec(endpoint=CHAT, input_file_id="file-gone").method())
        session.add(job)
    assert app.tasks[TASK_RUN_BATCH].apply(args=[job.id]).get() == "failed"
    with runtime.db.session() as session:
        batch = to_batch(repo.get_job(session, None, job.id))
    assert batch.status == "failed" and batch.errors and batch.failed_at
    assert app.tasks[TASK_RUN_BATCH].apply(args=[job.id]).get() == "skipped"


def line(**fields: object) -> bytes:
    return orjson.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": "m"}, **fields})


@pytest.mark.parametrize(("raw", "code"), [
    (b"{oops", "invalid_json"), (b"[1]", "invalid_request"), (line(custom_id=None), "missing_custom_id"),
    (line(custom_id=""), "missing_custom_id"), (line(method="GET"), "invalid_method"),
    (line(url="/v1/completions"), "invalid_url"), (line(body="text"), "invalid_body"),
    (line(body={"model": "m", "stream": True}), "invalid_body")])
def test_a_bad_line_is_refused_naming_why(raw: bytes, code: str) -> None:
    with pytest.raises(LineRefused) as refused:
        parse_line(raw, CHAT, set())
    assert refused.value.code == code


def test_a_custom_id_may_be_used_once() -> None:
    seen: set[str] = set()
    assert parse_line(line(), CHAT, seen).custom_id == "a"
    with pytest.raises(LineRefused, match="earlier line") as refused:
        parse_line(line(), CHAT, seen)
    assert refused.value.code == "duplicate_custom_id" and refused.value.custom_id == "a"
