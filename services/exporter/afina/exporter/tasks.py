"""Celery task bodies of the exporter worker: a few lines each, the work is in plain functions."""

from __future__ import annotations

from celery import shared_task

from afina.core.queue.jobs import run_stage
from afina.core.queue.names import TASK_EXPORT


@shared_task(name=TASK_EXPORT, bind=True)
def export_task(self, job_id: str) -> str:  # noqa: ANN001
    # imported here so a worker that only routes messages never loads torch or llama.cpp
    from afina.exporter.pipeline import export_job

    return run_stage(self.app.afina_runtime, job_id, "export", export_job)
