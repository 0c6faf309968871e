"""Celery task bodies of the trainer worker: a few lines each, the work is in plain functions."""

from __future__ import annotations

from celery import shared_task

from afina.core.queue.jobs import run_stage
from afina.core.queue.names import TASK_TRAIN
from afina.core.settings import Settings


def warm_up(settings: Settings) -> None:
    """Called by the worker in each new pool process (``worker_preload``): imports a job's libraries."""
    from afina.trainer.warmup import warm_up as preload

    preload(settings)


@shared_task(name=TASK_TRAIN, bind=True)
def train_task(self, job_id: str) -> str:  # noqa: ANN001
    # imported here so a worker that only routes messages never pays for torch
    from afina.trainer.recipe import train_job

    return run_stage(self.app.afina_runtime, job_id, "train", train_job)
