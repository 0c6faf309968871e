"""The Celery worker entry point shared by every service worker.

``celery -A afina.core.queue.worker worker -Q train`` with ``AFINA_WORKER_SERVICES``
naming the services whose tasks this process runs (``trainer``; the embedded
all-in-one worker runs ``ingest,trainer,exporter``). Task modules are loaded by
name, so services never import each other.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

# tasks run in prefork children, the metrics port is served by the parent: prometheus_client shares
# values through files in this folder, and must see it before anything imports it
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _METRICS_DIR = tempfile.mkdtemp(prefix="afina-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _METRICS_DIR
    _CREATOR_PID = os.getpid()
    atexit.register(lambda: os.getpid() == _CREATOR_PID and shutil.rmtree(_METRICS_DIR, ignore_errors=True))

from celery import Task  # noqa: E402
from celery.signals import task_prerun, worker_process_init, worker_ready, worker_shutting_down  # noqa: E402

from afina.core.logging import configure_logging  # noqa: E402
from afina.core.queue.names import SERVICE_TASK_MODULES, STAGE_TASKS  # noqa: E402
from afina.core.runtime import Runtime  # noqa: E402
from afina.core.settings import get_settings  # noqa: E402


def _services() -> list[str]:
    names = [name.strip() for name in os.environ.get("AFINA_WORKER_SERVICES", "").split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVICE_TASK_MODULES]
    if unknown:
        raise SystemExit(f"AFINA_WORKER_SERVICES names unknown services {unknown}; "
                         f"known: {sorted(SERVICE_TASK_MODULES)}")
    return names


settings = get_settings()
configure_logging(settings.log_level, settings.log_json)
runtime = Runtime(settings, include_tasks=[SERVICE_TASK_MODULES[name] for name in _services()])
app = runtime.celery


@worker_shutting_down.connect
def _drain_running_stages(**_kwargs: object) -> None:
    """SIGTERM/SIGINT: running stages checkpoint and hand their jobs back instead of being killed later."""
    from afina.core.queue.drain import request_drain

    request_drain(settings)


@worker_ready.connect
def _start_recovery(**_kwargs: object) -> None:
    from afina.core.metrics import serve_metrics
    from afina.core.queue.drain import clear_drain
    from afina.core.queue.jobs import start_maintenance_loop
    from afina.core.scratch import sweep_stale_scratch

    clear_drain(settings)

    runtime.db  # migrate before the first task  # noqa: B018
    start_maintenance_loop(runtime, extra=lambda: sweep_stale_scratch(settings))
    serve_metrics(settings.metrics_port, settings.metrics_host)


@worker_process_init.connect
def _fresh_connections(**_kwargs: object) -> None:
    """A forked pool child must not share the parent's database connections."""
    from afina.core.metrics import set_job_phase

    if "db" in runtime.__dict__:
        runtime.db.engine.dispose(close=False)
    set_job_phase("idle")
    if settings.worker_preload:
        _warm_up_services()


def _warm_up_services() -> None:
    """Let each service's task module import its heavy libraries now (``warm_up(settings)``, if it has one),
    so the first job does not pay for them; the pool process keeps them for every later job."""
    import importlib

    for name in _services():
        hook = getattr(importlib.import_module(SERVICE_TASK_MODULES[name]), "warm_up", None)
        if hook is not None:
            hook(settings)


_STAGE_OF_TASK = {task_name: stage for stage, (task_name, _queue) in STAGE_TASKS.items()}


@task_prerun.connect
def _observe_queue_wait(task: Task | None = None, **_kwargs: object) -> None:
    """How long the message waited, from the send time ``enqueue_stage`` stamps on it."""
    from afina.core.metrics import observe_queue_wait
    from afina.core.queue.app import SENT_AT_HEADER, message_sent_at

    stage = _STAGE_OF_TASK.get(getattr(task, "name", ""))
    if stage is not None:
        observe_queue_wait(stage, message_sent_at(task.request, SENT_AT_HEADER), time.time())
