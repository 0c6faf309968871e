"""The proxied inference routes answered without FastAPI's request handler, and still exactly as by it.

Every proxied request took FastAPI's route handler: reading the body, parsing it with ``json``, solving the
route's one dependency, validating the body, then the route's own function; with the layers around it that
was most of the gateway's own time per request (``bench/RESULTS.md``, Gateway). ``InferenceFastPath`` is a
pure-ASGI layer, inside ``GatewayMiddleware`` (so metrics, the ``x-ratelimit-*`` headers and the checks before
the body are its, unchanged), that answers a request for one of these routes itself:

1. the body is read through the same ``receive``: a missing key (401) or a body over the limit (413) is
   refused there by ``GatewayMiddleware``, before or while reading, as before;
2. a JSON body (``content-type: application/json``) that the route's body model validates from the bytes
   (``model_validate_json``, one pass in pydantic's parser) goes on to ``deps.inference_call`` (a NUL in a
   parameter 400, the key 401, its scope 403, its rate limit 429) and then to the route's own function, the
   same one FastAPI calls; an exception from either is answered by the app's exception handlers
   (``errors.mapped_answer``), the same mapping FastAPI's layers use;
3. anything else (a body that does not parse or validate, no or another content type, a client gone while
   its body was read) is handed to FastAPI's route with the bytes already read, and answered there exactly
   as it always was. FastAPI parses the body before the route's dependency runs and validates it after: a bad
   request keeps that order, and its answer, without a second copy of either here.

The routes stay declared on the app, so the API's document is unchanged, and anything this layer does not
take (another method, a trailing slash, a ``root_path``) is routed by FastAPI as before. Which routes it
takes is decided once, by ``fast_routes``: every route of the routers ``app.PROXIED_ROUTERS`` whose only
inputs are one JSON body model and ``deps.inference_call``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.gateway.deps import inference_call
from afina.gateway.errors import mapped_answer

# the content types whose bodies FastAPI parses as JSON and pydantic's parser reads the same way; another
# (a charset other than UTF-8, a ``+json`` type, none at all) goes to FastAPI, which decides what it means
JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8"})


@dataclass(frozen=True, slots=True)
class FastRoute:
    """A route this layer answers: the route object (the router's choice, for metrics and body limits), its
    function, and the names and model of that function's two parameters."""

    route: APIRoute
    endpoint: Callable[..., Awaitable[Any]]
    body_name: str
    body_model: type[BaseModel]
    call_name: str


def fast_routes(routers: Iterable[APIRouter]) -> dict[tuple[str, str], FastRoute]:
    """``(method, path)`` → the route, for every route of ``routers`` whose only inputs are one required JSON
    body model and the one dependency ``deps.inference_call``, and whose function says it returns a ``Response``
    (one FastAPI would send as it is, not serialise): anything else stays with FastAPI alone."""
    table: dict[tuple[str, str], FastRoute] = {}
    for router in routers:
        for route in router.routes:
            fast = _fast_route(route) if isinstance(route, APIRoute) else None
            if fast is not None:
                for method in route.methods:
                    table[(method, route.path)] = fast
    return table


def _fast_route(route: APIRoute) -> FastRoute | None:
    dependant = route.dependant
    if (dependant.path_params or dependant.query_params or dependant.header_params or dependant.cookie_params
            or len(dependant.body_params) != 1 or len(dependant.dependencies) != 1 or "{" in route.path
            or getattr(route, "_embed_body_fields", False)
            or any(getattr(dependant, name) for name in ("request_param_name", "websocket_param_name",
                                                         "http_connection_param_name", "response_param_name",
                                                         "background_tasks_param_name",
                                                         "security_scopes_param_name"))):
        return None
    body, call = dependant.body_params[0], dependant.dependencies[0]
    model = body.field_info.annotation
    if (call.call is not inference_call or call.dependencies or not body.field_info.is_required()
            or not (isinstance(model, type) and issubclass(model, BaseModel)) or body.alias != body.name
            or route.dependant.call is None or call.name is None or not _returns_response(route.dependant.call)):
        return None
    return FastRoute(route=route, endpoint=route.dependant.call, body_name=body.name, body_model=model,
                     call_name=call.name)


def _returns_response(endpoint: Callable[..., Any]) -> bool:
    try:
        returned = get_type_hints(endpoint).get("return")
    except (NameError, TypeError):  # an annotation that does not resolve: FastAPI decides what it means
        return False
    kinds = get_args(returned) if get_origin(returned) in (Union, UnionType) else (returned,)
    return bool(kinds) and all(isinstance(kind, type) and issubclass(kind, Response) for kind in kinds)


class InferenceFastPath:
    """The pure-ASGI layer (see the module's docstring); ``routes`` comes from ``fast_routes``."""

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], FastRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.routes.get((scope.get("method", ""), scope.get("path", ""))) \
            if scope["type"] == "http" and not scope.get("root_path") else None
        if fast is None:
            await self.app(scope, receive, send)
            return
        # what FastAPI's router would have put there: GatewayMiddleware labels its metrics and picks the body
        # limit by the route
        scope["route"] = fast.route
        scope["endpoint"] = fast.endpoint
        scope["path_params"] = {}
        read: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()  # a 401 or 413 before or while reading is raised here, and answered outside
            read.append(message)
            if message["type"] != "http.request":
                await self._by_fastapi(scope, read, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        content_type = next((value for name, value in scope["headers"] if name == b"content-type"), None)
        if content_type is None or content_type.lower() not in JSON_TYPES:
            await self._by_fastapi(scope, read, receive, send)
            return
        try:
            body = fast.body_model.model_validate_json(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except ValidationError:
            await self._by_fastapi(scope, read, receive, send)
            return
        await self._answer(fast, body, scope, receive, send)

    async def _answer(self, fast: FastRoute, body: BaseModel, scope: Scope, receive: Receive, send: Send) -> None:
        """The route's dependency and function, and their exceptions answered by the app's handlers, as
        Starlette's route wrapper does (a handled exception after the answer started is a ``RuntimeError``)."""
        request = Request(scope, receive)
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            call = await inference_call(request)
            response = await fast.endpoint(**{fast.body_name: body, fast.call_name: call})
            if not isinstance(response, Response):
                raise TypeError(f"{fast.route.path}'s function returned {type(response).__name__}, not a Response: "
                                "a fast-path route builds its own response")
            await response(scope, receive, sender)
        except Exception as exc:
            answer = await mapped_answer(request, exc)
            if answer is None:
                raise
            if started:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            await answer(scope, receive, sender)

    async def _by_fastapi(self, scope: Scope, read: list[Message], receive: Receive, send: Send) -> None:
        """FastAPI's route answers, reading first the messages this layer already read."""
        replay = iter(read)

        async def replayed() -> Message:
            message = next(replay, None)
            return message if message is not None else await receive()

        await self.app(scope, replayed, send)
