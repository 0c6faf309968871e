"""Prometheus metrics shared by the services, and the helpers to expose them.

Metric objects live in the default registry (created at import of this module,
which has no other side effect); workers expose them on their own port, the
gateway on ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest, start_http_server

JOB_STAGE_SECONDS = Histogram(
    "afina_job_stage_seconds", "Wall time of one job stage", ["stage", "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
JOBS_FINISHED = Counter("afina_jobs_finished_total", "Jobs reaching a terminal status", ["status"])
QUEUE_WAIT_SECONDS = Histogram("afina_queue_wait_seconds", "Time between enqueue and a worker starting the stage",
                               ["stage"])
TRAIN_STEP_SECONDS = Histogram("afina_train_step_seconds", "Optimizer step wall time",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
TRAIN_TOKENS_PER_SECOND = Gauge("afina_train_tokens_per_second", "Training throughput of the current job")
TRAIN_LOSS = Gauge("afina_train_loss", "Last logged training loss")
LEASES_RECOVERED = Counter("afina_leases_recovered_total", "Jobs requeued after their worker stopped heartbeating")
HTTP_REQUESTS = Counter("afina_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_SECONDS = Histogram("afina_http_request_seconds", "HTTP request latency", ["route", "method"])
INFERENCE_TOKENS = Counter("afina_inference_tokens_total", "Tokens served", ["kind"])
FILES_UPLOADED_BYTES = Counter("afina_files_uploaded_bytes_total", "Bytes accepted by /v1/files")


def render_latest() -> tuple[bytes, str]:
    """The exposition text and its content type, for an HTTP handler."""
    return generate_latest(), CONTENT_TYPE_LATEST


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose the metrics on ``host:port`` (a worker calls this once at start; port 0 disables)."""
    if port:
        start_http_server(port, addr=host)
