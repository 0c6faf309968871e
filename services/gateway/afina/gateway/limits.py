"""What is checked before a request body is read: that a key was sent, and that the body is not too large.

FastAPI reads and parses a JSON body before any dependency runs, the API key check
included, so without this a client with no key could make the gateway read and parse
a body of any size. The gateway's middleware (pure ASGI: nothing is buffered; see
``middleware.GatewayMiddleware``) asks ``RequestLimits`` at the moment the app first asks
for the body, when routing has chosen the route:

* 401 when the route needs a key (it depends on ``current_key`` or ``inference_call``) and the request has
  no ``Authorization: Bearer <key>`` header, or a malformed one: no byte of the body is
  read. Whether the key is valid is the route's own dependency; routes that read no body
  (every GET, and the upload route, which streams its body itself after its dependencies
  ran) answer 401 through it, in the same words;
* 413 when the body is over its limit: by ``Content-Length`` before reading, and while it
  streams for a chunked body. The limit is ``settings.max_json_body_bytes``, except on
  routes marked ``@streamed_upload``, which stream their multipart body themselves
  (``files/upload.py``, limited by ``max_upload_bytes`` and the form limits): for those
  this is only the outer bound.

Deciding from the chosen route, not from a list of paths, keeps a new endpoint covered;
``/health``, ``/metrics`` and the docs need no key, and an unknown path still answers 404.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from afina.core.errors import AuthenticationFailed
from afina.core.settings import Settings
from afina.gateway.deps import AUTHENTICATING, bearer_token
from afina.gateway.errors import error_response
from afina.gateway.files.upload import upload_body_limit

MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"
_UPLOAD_MARK = "__afina_streamed_upload__"

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def streamed_upload(endpoint: Endpoint) -> Endpoint:
    """Mark a route that reads its own multipart body as a stream (its limits are ``upload_body_limit``)."""
    setattr(endpoint, _UPLOAD_MARK, True)
    return endpoint


@dataclass(frozen=True)
class _Policy:
    authenticated: bool
    upload: bool


_OPEN = _Policy(authenticated=False, upload=False)


class Refused(Exception):
    """Raised into the app from ``receive`` when the body must not be read; the middleware answers."""


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str
    headers: dict[str, str] | None = None

    def response(self, scope: Scope) -> Response:
        return error_response(Request(scope), self.status, self.message, code=self.code, headers=self.headers)


class RequestLimits:
    """Key presence and body size, checked by the gateway's middleware (``middleware.GatewayMiddleware``) when
    the app first asks for the body (see the module's docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.json_limit = settings.max_json_body_bytes
        self.upload_limit = upload_body_limit(settings.max_upload_bytes, settings.max_form_fields,
                                              settings.max_form_field_bytes)
        self._policies: dict[int, _Policy] = {}  # by id() of the app's route objects, which live as long as it

    def check_before_reading(self, scope: Scope) -> tuple[Refusal | None, int]:
        """(a refusal or None, the body limit) for the route the router chose."""
        policy = self._policy(scope.get("route"))
        limit = self.upload_limit if policy.upload else self.json_limit
        if policy.authenticated:
            problem = _authorization_problem(scope)
            if problem is not None:
                return Refusal(401, problem, "invalid_api_key", {"WWW-Authenticate": "Bearer"}), limit
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return Refusal(413, too_large(limit), "request_too_large"), limit
        return None, limit

    def _policy(self, route: object) -> _Policy:
        if route is None:
            return _OPEN
        policy = self._policies.get(id(route))
        if policy is None:
            policy = _Policy(authenticated=_depends_on(route, AUTHENTICATING),
                             upload=bool(getattr(getattr(route, "endpoint", None), _UPLOAD_MARK, False)))
            self._policies[id(route)] = policy
        return policy


def _depends_on(route: object, dependencies: tuple[Callable[..., Any], ...]) -> bool:
    dependant = getattr(route, "dependant", None)
    pending = [dependant] if dependant is not None else []
    while pending:
        current = pending.pop()
        if current.call in dependencies:
            return True
        pending.extend(current.dependencies)
    return False


def _authorization_problem(scope: Scope) -> str | None:
    """Why the request's ``Authorization`` header cannot carry a key; None when it may."""
    header = next((value for name, value in scope.get("headers", ()) if name == b"authorization"), None)
    try:
        token = bearer_token(header.decode("latin-1") if header is not None else None)
    except AuthenticationFailed as exc:
        return exc.message
    return MISSING_KEY if token is None else None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"
