"""The error body of every ``/v1`` route, declared once so the OpenAPI document says what a client gets.

``afina.gateway.errors`` writes ``{"error": {"message", "type", "param", "code"}}`` for every
failure (all four keys, ``param`` and ``code`` may be null); routers declare the statuses they
answer with ``error_responses(...)`` so the document lists them with this body instead of
FastAPI's default 422 ``HTTPValidationError``, which afina never sends (a validation error is a
400 in OpenAI's shape).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorDetail(BaseModel):
    model_config = ConfigDict(title="ErrorDetail")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; the official client maps it to its typed exceptions by HTTP status."""

    error: ErrorDetail


ERROR_MEANINGS = {
    400: "Invalid request: the message says what to change, `param` names the parameter or form field.",
    401: "Missing, malformed, unknown, revoked or expired API key.",
    403: "The API key lacks the scope this route needs (inference, fine-tune or admin).",
    404: "No such object for this API key's tenant (another tenant's objects answer exactly like missing ones).",
    409: "The object's state does not allow this (e.g. cancelling a job that already ended).",
    413: "The request body or the uploaded file is larger than the server's limit.",
    416: "The `Range` asked for is not one range inside the file.",
    429: "Too many requests: the model's queue is full or the key's rate limit is spent; retry after "
         "`Retry-After` seconds.",
    500: "Unexpected server fault; the message carries an error id to quote to the operator.",
    502: "The model's backend failed and no fallback of its route could answer.",
    504: "The model's backend did not answer in time and no fallback of its route could answer.",
    503: "A dependency (database, store, broker, inference backend) is temporarily unavailable; retry after "
         "`Retry-After` seconds.",
}
# a status a route's own code never answers but a layer in front of it may (a size limit, a method check):
# documented as a range so the document stays true without FastAPI's 422 that afina never sends
OTHER_CLIENT_ERROR = "Another client error (a limit or a check in front of the route), in the same shape."
HEADERS = {
    401: {"WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}, "required": True}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"},
                          "required": True}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"},
                          "required": True}},
}
COMMON_STATUSES = (400, 401, 403, 500, 503)  # every authenticated route: its input, its key and its scope,
# a fault, a dependency


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router or route: the common statuses plus ``statuses``, each with ``ErrorResponse``."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*COMMON_STATUSES, *statuses}):
        response: dict[str, Any] = {"model": ErrorResponse, "description": ERROR_MEANINGS[status]}
        if status in HEADERS:
            response["headers"] = HEADERS[status]
        responses[status] = response
    responses["4XX"] = {"model": ErrorResponse, "description": OTHER_CLIENT_ERROR}
    return responses


def content(media_types: dict[str, dict[str, Any]], description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 whose body is not (only) the route's JSON model: ``{media type: schema}``."""
    return {200: {"description": description,
                  "content": {media_type: {"schema": schema} for media_type, schema in media_types.items()}}}


BINARY = {"type": "string", "format": "binary"}
TEXT = {"type": "string"}


def sse_event(data: str) -> dict[str, Any]:
    """The schema of one Server-Sent Event (OpenAPI 3.1: a ``text/event-stream`` schema describes each event);
    ``data`` says what its ``data:`` line carries. Comment lines (keep-alives) and ``retry:`` are no events."""
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "description": data}, "id": {"type": "string"},
                           "event": {"type": "string"}, "retry": {"type": "integer"}}}
