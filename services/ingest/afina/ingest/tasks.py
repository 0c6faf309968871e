"""Celery task bodies of the ingest worker: a few lines each, the work is in plain functions."""

from __future__ import annotations

from celery import shared_task

from afina.core.queue.jobs import run_stage
from afina.core.queue.names import TASK_INGEST_FILE, TASK_PREPARE_DATASET


@shared_task(name=TASK_PREPARE_DATASET, bind=True)
def prepare_dataset_task(self, job_id: str) -> str:  # noqa: ANN001
    from afina.ingest.prepare import prepare_dataset

    return run_stage(self.app.afina_runtime, job_id, "ingest", prepare_dataset)


@shared_task(name=TASK_INGEST_FILE, bind=True)
def ingest_file_task(self, file_id: str) -> str:  # noqa: ANN001
    from afina.ingest.process_file import process_uploaded_file

    return process_uploaded_file(self.app.afina_runtime, file_id)
