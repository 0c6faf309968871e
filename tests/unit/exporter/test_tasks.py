"""The Celery task: registered under TASK_EXPORT, its body runs the stage through run_stage."""

from __future__ import annotations

from pathlib import Path

from afina.core.db import repository as repo
from afina.core.queue.names import SERVICE_TASK_MODULES, TASK_EXPORT
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.support.jobs import create_job


def test_task_is_registered_and_runs_the_export_stage(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False), include_tasks=[SERVICE_TASK_MODULES["exporter"]])
    app = runtime.celery
    app.loader.import_default_modules()
    assert TASK_EXPORT in app.tasks
    job = create_job(runtime, "acme", "file-test", stage="export", status="running")
    # no adapter was stored: the stage runs and fails the job with a clear message
    assert app.tasks[TASK_EXPORT].apply(args=[job.id]).get() == "failed"
    with runtime.db.session() as session:
        row = repo.get_job(session, None, job.id)
    assert row.status == "failed" and "no committed adapter" in row.error["message"]
    assert app.tasks[TASK_EXPORT].apply(args=[job.id]).get() == "skipped"  # terminal jobs are left alone
