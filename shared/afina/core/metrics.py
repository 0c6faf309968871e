"""Prometheus metrics shared by the services, and the helpers to expose them.

Metric objects live in the default registry (created at import of this module,
which has no other side effect); workers expose them on their own port, the
gateway on ``/metrics``.

A Celery prefork worker runs its tasks in child processes while the metrics port
is served by the parent, so the worker entry point sets ``PROMETHEUS_MULTIPROC_DIR``
before anything imports ``prometheus_client``: every process then writes its
values to files there and the parent's endpoint merges them (``metrics_registry``).
Gauges say how they merge: the most recent value of a live process (throughput,
loss, memory), or the sum over live processes (how many are in each phase).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.metrics_core import Metric

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB_PHASES = ("idle", "ingest", "train", "export", "evaluate")
GPU_MEMORY_KINDS = ("allocated", "reserved", "peak")

JOB_STAGE_SECONDS = Histogram(
    "afina_job_stage_seconds", "Wall time of one job stage", ["stage", "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
JOBS_FINISHED = Counter("afina_jobs_finished_total", "Jobs reaching a terminal status, by outcome", ["status"])
QUEUE_WAIT_SECONDS = Histogram(
    "afina_queue_wait_seconds", "Time between a stage's message being sent and a worker starting it", ["stage"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400),
)
JOB_PHASE = Gauge("afina_job_phase", "Worker processes now in each phase (idle, ingest, train, export, evaluate)",
                  ["phase"], multiprocess_mode="livesum")
TRAIN_STEP_SECONDS = Histogram("afina_train_step_seconds", "Optimizer step wall time",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
TRAIN_TOKENS_PER_SECOND = Gauge("afina_train_tokens_per_second",
                                "Training throughput of the current job (non-padding tokens a second)",
                                multiprocess_mode="livemostrecent")
TRAIN_LOSS = Gauge("afina_train_loss", "Last logged training loss", multiprocess_mode="livemostrecent")
GPU_MEMORY_BYTES = Gauge("afina_gpu_memory_bytes",
                         "GPU memory of the training process: allocated and reserved now, peak since the run began",
                         ["device", "kind"], multiprocess_mode="livemostrecent")
LEASES_RECOVERED = Counter("afina_leases_recovered_total", "Jobs requeued after their worker stopped heartbeating")
OUTBOX_SENT = Counter("afina_outbox_sent_total", "Queue messages handed to the broker from the outbox")
OUTBOX_PENDING = Gauge("afina_outbox_pending", "Outbox messages not yet handed to the broker (last relay sweep)",
                       multiprocess_mode="livemax")
STAGES_REQUEUED = Counter("afina_stages_requeued_total",
                          "Stages handed back to the queue instead of failing, by reason", ["reason"])
HTTP_REQUESTS = Counter("afina_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_SECONDS = Histogram("afina_http_request_seconds", "HTTP request latency", ["route", "method"])
INFERENCE_TOKENS = Counter("afina_inference_tokens_total", "Tokens served", ["kind"])
# the gateway's inference, labelled by model and route through ``bounded_label`` (a tenant with thousands of
# models must not make thousands of series: past ``LABEL_VALUES_MAX`` values a label reads "other")
INFERENCE_LABELS = ["model", "route", "tenant"]
GATEWAY_REQUEST_SECONDS = Histogram("afina_inference_request_seconds",
                                    "An answered inference call, from its start to its last byte", INFERENCE_LABELS,
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
GATEWAY_TTFT_SECONDS = Histogram("afina_inference_time_to_first_token_seconds",
                                 "A stream's time to its first piece of text", INFERENCE_LABELS,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
GATEWAY_TOKENS_PER_SECOND = Histogram("afina_inference_output_tokens_per_second",
                                      "Completion tokens per second of generation (after the first token)",
                                      ["model"], buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600))
GATEWAY_TOKENS = Counter("afina_inference_exchange_tokens_total", "Tokens of answered calls, in and out",
                         ["kind", *INFERENCE_LABELS])
GATEWAY_QUEUE_WAIT = Histogram("afina_inference_queue_wait_seconds", "Time a request waited for a model's slot",
                               ["model"])
GATEWAY_FALLBACKS = Counter("afina_inference_fallbacks_total",
                            "Requests a route's next target answered because the one before failed (or, "
                            "having just failed, was skipped)",
                            ["route", "failed_target"])
GATEWAY_UPSTREAM_ERRORS = Counter("afina_inference_upstream_errors_total",
                                  "Failed calls to a backend, by backend and HTTP-like status", ["backend", "status"])
LABEL_VALUES_MAX = 200
FILES_UPLOADED_BYTES = Counter("afina_files_uploaded_bytes_total", "Bytes accepted by /v1/files")


_phases_seen: set[str] = set(JOB_PHASES)
_label_values: dict[str, set[str]] = {}


def bounded_label(family: str, value: str) -> str:
    """``value`` while the label ``family`` has seen fewer than ``LABEL_VALUES_MAX`` values, else "other"."""
    seen = _label_values.setdefault(family, set())
    if value in seen:
        return value
    if len(seen) >= LABEL_VALUES_MAX:
        return "other"
    seen.add(value)
    return value


def set_job_phase(phase: str) -> None:
    """Mark this process as being in ``phase`` (a stage name or ``idle``) and in no other.

    A stage added later needs no change here: any name is accepted, never raised on, so the
    metrics can never be what fails a job."""
    _phases_seen.add(phase)
    for name in _phases_seen:
        JOB_PHASE.labels(phase=name).set(1 if name == phase else 0)


def observe_queue_wait(stage: str, sent_at: float | None, started_at: float) -> None:
    """Record how long ``stage``'s message waited; a message without a send time is not counted."""
    if sent_at is None:
        return
    QUEUE_WAIT_SECONDS.labels(stage=stage).observe(max(0.0, started_at - sent_at))


def set_gpu_memory(device: int, allocated_bytes: int, reserved_bytes: int, peak_bytes: int) -> None:
    for kind, value in zip(GPU_MEMORY_KINDS, (allocated_bytes, reserved_bytes, peak_bytes), strict=True):
        GPU_MEMORY_BYTES.labels(device=str(device), kind=kind).set(value)


class _LiveProcessesCollector(_multiprocess.MultiProcessCollector):
    """Merges the processes' files, first dropping the live-only gauges of processes that died
    (a SIGKILLed pool child never removes its own)."""

    _LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")

    def collect(self) -> Iterable[Metric]:
        for pid in {int(m.group(1)) for m in map(self._LIVE_FILE.match, os.listdir(self._path)) if m}:
            if not _alive(pid):
                _multiprocess.mark_process_dead(pid, self._path)
        return super().collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def metrics_registry() -> CollectorRegistry:
    """What to expose: this process's default registry or, with ``PROMETHEUS_MULTIPROC_DIR`` set, a
    registry merging every process that writes there."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    _LiveProcessesCollector(registry, path=str(Path(directory)))
    return registry


def render_latest() -> tuple[bytes, str]:
    """The exposition text and its content type, for an HTTP handler."""
    return generate_latest(metrics_registry()), CONTENT_TYPE_LATEST


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose the metrics on ``host:port`` (a worker calls this once at start; port 0 disables)."""
    if port:
        start_http_server(port, addr=host, registry=metrics_registry())
