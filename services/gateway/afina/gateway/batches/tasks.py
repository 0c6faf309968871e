"""Celery task body of the batch worker (``AFINA_WORKER_SERVICES=batcher``): a few lines, the work is in
``runner``. It lives in the gateway's package because a batch is answered by the gateway's serving code."""

from __future__ import annotations

from celery import shared_task

from afina.core.batches import BATCH_STAGE
from afina.core.queue.jobs import run_stage
from afina.core.queue.names import TASK_RUN_BATCH


@shared_task(name=TASK_RUN_BATCH, bind=True)
def run_batch_task(self, batch_id: str) -> str:  # noqa: ANN001
    from afina.gateway.batches.runner import run_batch

    return run_stage(self.app.afina_runtime, batch_id, BATCH_STAGE, run_batch)
