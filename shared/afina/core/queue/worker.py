"""The Celery worker entry point shared by every service worker.

``celery -A afina.core.queue.worker worker -Q train`` with ``AFINA_WORKER_SERVICES``
naming the services whose tasks this process runs (``trainer``; the embedded
all-in-one worker runs ``ingest,trainer,exporter``). Task modules are loaded by
name, so services never import each other.
"""

from __future__ import annotations

import os

from celery.signals import worker_process_init, worker_ready

from afina.core.logging import configure_logging
from afina.core.queue.names import SERVICE_TASK_MODULES
from afina.core.runtime import Runtime
from afina.core.settings import get_settings


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


@worker_ready.connect
def _start_recovery(**_kwargs: object) -> None:
    from afina.core.metrics import serve_metrics
    from afina.core.queue.jobs import start_recovery_loop

    runtime.db  # migrate before the first task  # noqa: B018
    start_recovery_loop(runtime)
    serve_metrics(settings.metrics_port, settings.metrics_host)


@worker_process_init.connect
def _fresh_connections(**_kwargs: object) -> None:
    """A forked pool child must not share the parent's database connections."""
    if "db" in runtime.__dict__:
        runtime.db.engine.dispose(close=False)
