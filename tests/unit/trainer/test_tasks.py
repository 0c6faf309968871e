"""The Celery task: registered under TASK_TRAIN, its body runs the stage through run_stage."""

from __future__ import annotations

import sys
from pathlib import Path

from afina.core.db import repository as repo
from afina.core.queue.names import SERVICE_TASK_MODULES, TASK_TRAIN
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.support.jobs import create_job


def test_importing_the_trainer_loads_no_torch() -> None:
    import afina.core.training  # noqa: F401
    import afina.trainer.recipe  # noqa: F401
    import afina.trainer.tasks  # noqa: F401

    if "torch" in sys.modules:  # another test of this session imported it: check in a fresh interpreter
        import subprocess

        code = ("import sys, afina.core.training, afina.trainer.recipe, afina.trainer.tasks; "
                "assert 'torch' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True)


def test_task_is_registered_and_runs_the_train_stage(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False), include_tasks=[SERVICE_TASK_MODULES["trainer"]])
    app = runtime.celery
    app.loader.import_default_modules()
    assert TASK_TRAIN in app.tasks
    job = create_job(runtime, "acme", "file-test", stage="train", status="queued")
    # no prepared dataset: the stage runs and fails the job with a clear message, before loading any model
    assert app.tasks[TASK_TRAIN].apply(args=[job.id]).get() == "failed"
    with runtime.db.session() as session:
        row = repo.get_job(session, None, job.id)
    assert row.status == "failed" and "no prepared dataset" in row.error["message"]
    assert row.error["code"] == "training_failed"
    assert app.tasks[TASK_TRAIN].apply(args=[job.id]).get() == "skipped"  # terminal jobs are left alone
