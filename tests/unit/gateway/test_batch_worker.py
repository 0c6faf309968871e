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
from afina.gateway.batches.runner import EXPIRED_ERROR, LineRefused, expired_line, parse_line
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


def test_a_request_the_window_left_unrun_keeps_its_custom_id_when_it_has_one() -> None:
    assert expired_line(line(custom_id="late"))["custom_id"] == "late"
    assert expired_line(b"{oops")["custom_id"] is None
    assert expired_line(line())["error"] == {"code": "batch_expired", "message": EXPIRED_ERROR["message"]}
    assert expired_line(line())["response"] is None


def test_a_stopped_batch_with_expired_at_is_expired_and_its_usage_is_summed() -> None:
    spec = BatchSpec(endpoint=CHAT, input_file_id="file-x")
    spec.progress.expired_at, spec.progress.prompt_tokens, spec.progress.completion_tokens = 1_000, 30, 12
    job = Job(id="batch_x", tenant_id="acme", model=CHAT, status="cancelled", created_at=100, finished_at=1_000,
              method=spec.method(), kind=BATCH_KIND)
    batch = to_batch(job)
    assert batch.status == "expired" and batch.expired_at == 1_000 and batch.cancelled_at is None
    assert batch.expires_at == 100 + 24 * 3600
    assert (batch.usage.input_tokens, batch.usage.output_tokens, batch.usage.total_tokens) == (30, 12, 42)
    spec.progress.expired_at = None
    job.method = spec.method()
    assert to_batch(job).status == "cancelled"


def test_batch_files_open_to_the_inference_scope_and_training_files_do_not() -> None:
    from afina.core.errors import PermissionDenied
    from afina.core.keys import KeyGrant
    from afina.gateway.files.service import check_file_scope

    inference = KeyGrant(tenant_id="acme", prefix="afk-i", scopes=("inference",))
    fine_tune = KeyGrant(tenant_id="acme", prefix="afk-f", scopes=("fine-tune",))
    for purpose in ("batch", "batch_output"):
        check_file_scope(inference, purpose)
        check_file_scope(fine_tune, purpose)
    for purpose in ("fine-tune", "fine-tune-results"):
        check_file_scope(fine_tune, purpose)
        with pytest.raises(PermissionDenied, match="'fine-tune' scope"):
            check_file_scope(inference, purpose)
    check_file_scope(None, "fine-tune")  # a worker, no key
