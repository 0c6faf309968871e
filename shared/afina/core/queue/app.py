"""The Celery application, configured the careful way (ARCHITECTURE.md: rules that keep data safe)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from afina.core.queue.names import QUEUE_INGEST, STAGE_TASKS, TASK_INGEST_FILE
from afina.core.settings import Settings


def create_celery_app(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app on the configured broker: Redis in production, the filesystem when embedded."""
    app = Celery("afina", broker=settings.resolved_broker_url, include=include or [])
    transport_options: dict = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.resolved_broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=QUEUE_INGEST,
        task_routes={task: {"queue": queue} for task, queue in STAGE_TASKS.values()},
    )
    app.conf.task_create_missing_queues = True
    app.conf.task_annotations = task_time_limits(settings)
    return app


def task_time_limits(settings: Settings) -> dict[str, dict[str, int]]:
    """Celery's soft and hard time limits for every task, per stage (``AFINA_STAGE_TIME_LIMITS_S``).

    Past the soft limit the stage gets ``SoftTimeLimitExceeded`` and fails its job with a message
    that says which limit; past the hard one the worker kills the process (a stage that ignores the
    soft limit), and the job's attempt is counted like any other lost worker.
    """
    limits = {}
    for stage, (task_name, _queue) in [*STAGE_TASKS.items(), ("file_ingest", (TASK_INGEST_FILE, QUEUE_INGEST))]:
        soft, hard = settings.stage_time_limits(stage)
        limits[task_name] = {"soft_time_limit": soft, "time_limit": hard}
    return limits


SENT_AT_HEADER = "afina_sent_at"  # epoch seconds the message was sent: the worker measures queue wait from it
OUTBOX_ID_HEADER = "afina_outbox_id"  # the outbox row a message was sent from (for tracing a duplicate)


def send_message(app: Celery, task_name: str, queue: str, subject_id: str, *,
                 headers: dict[str, Any] | None = None) -> None:
    """Hand one message to the broker now, stamped with its send time (the outbox is the only sender in
    production code: a state change and its message commit together there)."""
    app.send_task(task_name, args=[subject_id], queue=queue, headers={SENT_AT_HEADER: time.time(), **(headers or {})})


def enqueue_stage(app: Celery, stage: str, job_id: str) -> None:
    """Send the message that moves ``job_id`` through ``stage`` directly, outside any transaction (tests and
    operators' tools; safe to send twice: leases dedupe)."""
    task_name, queue = STAGE_TASKS[stage]
    send_message(app, task_name, queue, job_id)


def message_sent_at(request: Any, header: str = SENT_AT_HEADER) -> float | None:
    """The send time stamped on a task's message (``task.request``), or None for a message without one."""
    value = getattr(request, header, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(header)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None

