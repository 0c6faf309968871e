"""Celery task bodies of the evaluator worker: a few lines each, the work is in plain functions."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from afina.core.queue.jobs import run_stage
from afina.core.queue.names import TASK_EVALUATE


@shared_task(name=TASK_EVALUATE, bind=True)
def evaluate_task(self, job_id: str) -> str:  # noqa: ANN001
    # imported here so a worker that only routes messages never loads torch or llama.cpp
    from afina.evaluator.pipeline import evaluate_job

    return run_stage(self.app.afina_runtime, job_id, "evaluate", evaluate_job)


def warm_up(_settings: Any) -> None:
    """Import the heavy libraries once per pool process, before the first evaluation."""
    import llama_cpp  # noqa: F401
    import sacrebleu  # noqa: F401
    import transformers  # noqa: F401
