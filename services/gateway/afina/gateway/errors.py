"""Every error the gateway answers, mapped once to the wire format of the API it was asked on.

``/v1/*`` answers OpenAI's ``{"error": {"message", "type", "param", "code"}}``, which the
official client turns into its typed exceptions by HTTP status; ``/api/*`` answers
Ollama's ``{"error": "..."}``. Unexpected exceptions become a 500 whose body says
nothing about the fault (the log has it, with secrets redacted).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from afina.core.errors import AfinaError, Overloaded
from afina.core.logging import log_event, new_error_id
from afina.core.transient import is_transient

log = logging.getLogger("afina.gateway")

OLLAMA_PREFIX = "/api/"
STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "file_too_large"}


def error_response(request: Request, status: int, message: str, *, error_type: str | None = None,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body in the shape the request's API family expects."""
    if request.url.path.startswith(OLLAMA_PREFIX):
        body: dict[str, Any] = {"error": message}
    else:
        body = {"error": {"message": message,
                          "type": error_type or STATUS_TYPES.get(status, "server_error"),
                          "param": param,
                          "code": code if code is not None else STATUS_CODES.get(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_param(location: tuple[Any, ...]) -> str | None:
    """``("body", "hyperparameters", "n_epochs")`` → ``"hyperparameters.n_epochs"``; pydantic's union
    branch tags (``"int"``, ``"constrained-str"``, ``"literal['auto']"``, ``"function-after[...]"``) are dropped."""
    parts = [str(part) for part in location[1:] if not _is_union_tag(part)]
    return ".".join(parts) or (str(location[0]) if location else None)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-")
                                      or part in {"int", "float", "str", "bool", "dict", "list"})


async def _afina_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AfinaError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if exc.http_status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, Overloaded):
        headers = {**exc.headers, "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if exc.http_status >= 500:
        log_event(log, "request.failed", logging.WARNING, path=request.url.path, code=exc.code, message=exc.message)
    return error_response(request, exc.http_status, exc.message, error_type=exc.error_type, param=exc.param,
                          code=exc.code, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return error_response(request, 400, "We could not parse the JSON body of your request: "
                              f"{first.get('ctx', {}).get('error', 'invalid JSON')}.", code="invalid_json")
    param = validation_param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid '{param}': {message}."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) in this request)"
    return error_response(request, 400, message, error_type="invalid_request_error", param=param,
                          code="invalid_request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


RETRY_AFTER_S = 5


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # the formatter redacts secrets from the traceback; the client learns nothing about the fault but an id
    error_id = new_error_id()
    if is_transient(exc):  # the database, the store or the broker did not answer: the client may retry
        log_event(log, "request.unavailable", logging.WARNING, path=request.url.path, error=type(exc).__name__,
                  error_id=error_id)
        return error_response(request, 503, f"A service afina depends on is temporarily unavailable; retry in a "
                              f"few seconds (error id {error_id}).", error_type="server_error",
                              code="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    log.error("request.crashed", exc_info=exc, extra={"fields": {"path": request.url.path, "error_id": error_id,
                                                                 "error": type(exc).__name__}})
    return error_response(request, 500, f"The server had an error while processing your request "
                          f"(error id {error_id}).", error_type="server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the mappings on ``app`` (done once by ``create_app``)."""
    app.add_exception_handler(AfinaError, _afina_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def mapped_answer(request: Request, exc: Exception) -> Response | None:
    """The answer the app's exception handlers give ``exc``, found as Starlette's exception layer finds it (the
    first class of its MRO with a handler), for code that runs outside that layer (``fast_path``). None when
    only the catch-all ``Exception`` handler would answer: that one belongs to the outermost layer, and the
    exception is to be raised on to it, as from any route."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = handlers.get(cls)
        if handler is not None:
            return await handler(request, exc)
    return None
