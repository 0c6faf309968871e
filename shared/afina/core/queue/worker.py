"""The Celery worker entry point shared by every service worker.

``celery -A afina.core.queue.worker worker -Q train`` with ``AFINA_WORKER_SERVICES``
naming the services whose tasks this process runs (``trainer``; the embedded
all-in-one worker runs ``ingest,trainer,exporter``). Task modules are loaded by
name, so services never import each other.

Importing this module does nothing: Celery's ``-A`` reads its ``app`` attribute, and that
first read runs ``create_worker_app`` (the Prometheus folder, settings, logging, the runtime
and the signal handlers), once per process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

from afina.core.queue.names import SERVICE_TASK_MODULES, STAGE_TASKS

if TYPE_CHECKING:
    from celery import Celery, Task

    from afina.core.runtime import Runtime
    from afina.core.settings import Settings

_STAGE_OF_TASK = {task_name: stage for stage, (task_name, _queue) in STAGE_TASKS.items()}
_app: Celery | None = None


def services() -> list[str]:
    """The services ``AFINA_WORKER_SERVICES`` names; ``SystemExit`` naming an unknown one."""
    names = [name.strip() for name in os.environ.get("AFINA_WORKER_SERVICES", "").split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVICE_TASK_MODULES]
    if unknown:
        raise SystemExit(f"AFINA_WORKER_SERVICES names unknown services {unknown}; "
                         f"known: {sorted(SERVICE_TASK_MODULES)}")
    return names


def create_worker_app() -> Celery:
    """The worker's Celery app, built on the first call of this process (later calls return it)."""
    global _app
    if _app is not None:
        return _app
    _share_metrics_between_processes()  # before anything imports prometheus_client
    from afina.core.logging import configure_logging
    from afina.core.runtime import Runtime
    from afina.core.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    runtime = Runtime(settings, include_tasks=[SERVICE_TASK_MODULES[name] for name in services()])
    _connect_signals(runtime, settings)
    _app = runtime.celery
    return _app


def __getattr__(name: str) -> Any:
    # ``celery -A afina.core.queue.worker`` looks up ``app``: build it then, not at import
    if name == "app":
        return create_worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _share_metrics_between_processes() -> None:
    """Tasks run in prefork children, the metrics port is served by the parent: prometheus_client shares
    values through files in this folder, and must see it before it is imported."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    metrics_dir = tempfile.mkdtemp(prefix="afina-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    creator_pid = os.getpid()
    atexit.register(lambda: os.getpid() == creator_pid and shutil.rmtree(metrics_dir, ignore_errors=True))


def _connect_signals(runtime: Runtime, settings: Settings) -> None:
    from celery.signals import celeryd_after_setup, task_prerun, worker_process_init, worker_ready, worker_shutting_down

    def consume_gpu_class_queues(instance: Any = None, **_kwargs: object) -> None:
        """A trainer also consumes its GPU class's queues (``train.<class>``, ``…x<N>`` for the GPUs it owns),
        whatever ``-Q`` named: the settings say which, so the runner, compose and Kubernetes cannot disagree."""
        from afina.core.gpu_classes import worker_train_queues

        if "trainer" in services() and instance is not None:
            for queue in worker_train_queues(settings):
                instance.app.amqp.queues.select_add(queue)

    def drain_running_stages(**_kwargs: object) -> None:
        """SIGTERM/SIGINT: running stages checkpoint and hand their jobs back instead of being killed later."""
        from afina.core.queue.drain import request_drain

        request_drain(settings)

    def start_recovery(**_kwargs: object) -> None:
        from afina.core.metrics import serve_metrics
        from afina.core.queue.drain import clear_drain
        from afina.core.queue.jobs import start_maintenance_loop
        from afina.core.scratch import sweep_stale_scratch

        clear_drain(settings)
        runtime.db  # migrate before the first task  # noqa: B018
        start_maintenance_loop(runtime, extra=lambda: sweep_stale_scratch(settings))
        serve_metrics(settings.metrics_port, settings.metrics_host)

    def fresh_connections(**_kwargs: object) -> None:
        """A forked pool child must not share the parent's database connections."""
        from afina.core.metrics import set_job_phase

        if "db" in runtime.__dict__:
            runtime.db.engine.dispose(close=False)
        set_job_phase("idle")
        if settings.worker_preload:
            _warm_up_services(settings)

    def observe_queue_wait(task: Task | None = None, **_kwargs: object) -> None:
        """How long the message waited, from the send time ``enqueue_stage`` stamps on it."""
        from afina.core.metrics import observe_queue_wait as observe
        from afina.core.queue.app import SENT_AT_HEADER, message_sent_at

        stage = _STAGE_OF_TASK.get(getattr(task, "name", ""))
        if stage is not None and task is not None:
            observe(stage, message_sent_at(task.request, SENT_AT_HEADER), time.time())

    # weak=False: these closures have no other reference, and a weakly held receiver would be collected
    celeryd_after_setup.connect(consume_gpu_class_queues, weak=False)
    worker_shutting_down.connect(drain_running_stages, weak=False)
    worker_ready.connect(start_recovery, weak=False)
    worker_process_init.connect(fresh_connections, weak=False)
    task_prerun.connect(observe_queue_wait, weak=False)


def _warm_up_services(settings: Settings) -> None:
    """Let each service's task module import its heavy libraries now (``warm_up(settings)``, if it has one),
    so the first job does not pay for them; the pool process keeps them for every later job."""
    import importlib

    for name in services():
        hook = getattr(importlib.import_module(SERVICE_TASK_MODULES[name]), "warm_up", None)
        if hook is not None:
            hook(settings)
