"""The Celery task: registered under TASK_EVALUATE on the ``evaluate`` queue, its body runs the stage."""

from __future__ import annotations

from pathlib import Path

from afina.core.db import repository as repo
from afina.core.evaluation_jobs import add_evaluation_job
from afina.core.queue.names import SERVICE_QUEUES, SERVICE_TASK_MODULES, STAGE_TASKS, TASK_EVALUATE
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.support.jobs import create_job


def test_the_evaluate_stage_has_its_own_queue_and_service() -> None:
    assert STAGE_TASKS["evaluate"] == (TASK_EVALUATE, "evaluate")
    assert SERVICE_QUEUES["evaluator"] == "evaluate"
    assert SERVICE_TASK_MODULES["evaluator"] == "afina.evaluator.tasks"


def test_task_is_registered_and_an_evaluation_of_a_missing_model_fails_naming_it(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False), include_tasks=[SERVICE_TASK_MODULES["evaluator"]])
    app = runtime.celery
    app.loader.import_default_modules()
    assert TASK_EVALUATE in app.tasks
    source = create_job(runtime, "acme", "file-test", stage="done", status="running")
    with runtime.db.session() as session:
        add_evaluation_job(session, repo.get_job(session, None, source.id), "ft:gone")
        evaluation = [j for j in repo.list_jobs(session, "acme", None, 10, kind="evaluation")[0]][0]
    assert app.tasks[TASK_EVALUATE].apply(args=[evaluation.id]).get() == "failed"
    with runtime.db.session() as session:
        row = repo.get_job(session, None, evaluation.id)
        untouched = repo.get_job(session, None, source.id)
    assert row.error["code"] == "model_not_found" and "model ft:gone is not registered" in row.error["message"]
    assert untouched.status == "running" and untouched.error is None
    assert app.tasks[TASK_EVALUATE].apply(args=[evaluation.id]).get() == "skipped"
