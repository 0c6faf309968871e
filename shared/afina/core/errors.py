"""Typed errors of afina.

Core code raises these; each service maps them once to its wire format
(OpenAI's ``{"error": {...}}`` on ``/v1``, Ollama's ``{"error": "..."}`` on
``/api``). ``http_status`` and ``code`` travel with the exception so the
mapping needs no table of its own.
"""

from __future__ import annotations

from typing import Any


class AfinaError(Exception):
    """Base of every error afina reports to a user."""

    http_status: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(AfinaError):
    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(AfinaError):
    http_status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(AfinaError):
    http_status = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class NotFound(AfinaError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(AfinaError):
    http_status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(AfinaError):
    http_status = 413
    error_type = "invalid_request_error"
    code = "file_too_large"


class DatasetInvalid(AfinaError):
    """A training file broke a data rule; ``line`` is 1-based in the uploaded file."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_training_file"

    def __init__(self, message: str, *, line: int | None = None, rule: str | None = None,
                 param: str | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{message}", param=param, code=rule or self.code)
        self.line = line
        self.rule = rule


class StoreError(AfinaError):
    """The object store failed in a way the caller cannot fix."""

    http_status = 503
    error_type = "server_error"
    code = "store_unavailable"


class ServiceUnavailable(AfinaError):
    """A dependency (database, store, broker) did not answer: a passing fault, the same call may succeed
    shortly (``afina.core.transient`` retries these, the API answers 503 with ``Retry-After``)."""

    http_status = 503
    error_type = "server_error"
    code = "service_unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The object store could not be reached (connection refused, reset, timed out)."""

    code = "store_unavailable"


class QueueUnavailable(ServiceUnavailable):
    """The message broker refused a message; the caller may retry later."""

    code = "queue_unavailable"


class ObjectMissing(NotFound):
    code = "object_missing"


class TrainingFailed(AfinaError):
    error_type = "server_error"
    code = "training_failed"


class InsufficientMemory(TrainingFailed):
    """A run that does not fit the memory its worker has, with the figures a router needs to send it to a
    larger GPU (``afina.core.gpu_classes``) before failing it."""

    code = "insufficient_memory"

    def __init__(self, message: str, *, needed_bytes: float, available_bytes: float) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class ExportFailed(AfinaError):
    error_type = "server_error"
    code = "export_failed"


class EvaluationFailed(AfinaError):
    """An evaluation that cannot run on what it was given (no held-out examples, a label set that does not
    fit, an unknown metric): it fails naming the problem, and the job and model it evaluates stay as they were."""

    error_type = "invalid_request_error"
    code = "evaluation_failed"


class ModelBlocked(AfinaError):
    """The operator enforces the quality gate and this model failed it: it is not served."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "model_blocked_by_quality_gate"


class InferenceUnavailable(AfinaError):
    http_status = 503
    error_type = "server_error"
    code = "model_unavailable"


class Overloaded(AfinaError):
    """Too many requests in flight or waiting (a model's queue is full, a key's rate limit is spent):
    answered 429 with ``Retry-After``; the same call succeeds once the load passes."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}  # a key's x-ratelimit-* state, when its limit is what refused


class UpstreamFailed(AfinaError):
    """Every backend that could answer for a model failed (down, refused, 5xx) and no fallback was left."""

    http_status = 502
    error_type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(AfinaError):
    """The model's backend did not answer in time and no fallback was left."""

    http_status = 504
    error_type = "server_error"
    code = "upstream_timeout"


class LeaseLost(Exception):
    """This worker no longer owns the job (it stalled and another took over): it must stop writing to it.

    Not an ``AfinaError``: no user ever sees it; the stage that raises it just stops.
    """
