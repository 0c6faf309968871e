"""The one ASGI middleware around every request of the gateway.

Pure ASGI (a streamed response is timed to its last byte and never buffered), and one layer for what
were three: each layer's wrapping of ``receive`` and ``send`` cost about as much as its own work, on the
path every proxied request takes. It does, in this order around the app:

* request metrics by route template (``/v1/files/{file_id}``, never the raw path: ids would explode the
  label set), status and duration;
* a key's ``x-ratelimit-*`` headers on every answer of a rate-limited route (a refusal carries them
  itself), streamed or not: at the response's start, whatever built it;
* key presence and body size, checked when the app first asks for the body (``limits``): a refusal
  there is answered here, whatever the app made of it;
* when the request arrived (``registry.cache.REQUEST_STARTED``), so its registry lookups read the
  registry's generation counter once.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.core.metrics import HTTP_REQUESTS, HTTP_SECONDS
from afina.core.settings import Settings
from afina.gateway.limits import Refusal, Refused, RequestLimits, too_large
from afina.gateway.registry.cache import REQUEST_STARTED
from afina.gateway.serving.metric_series import series
from afina.gateway.serving.ratelimit import RATE_STATE

UNMATCHED = "unmatched"

__all__ = ["RATE_STATE", "UNMATCHED", "GatewayMiddleware"]


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limits = RequestLimits(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started_at = time.perf_counter()
        arrival = REQUEST_STARTED.set(started_at)
        refusal: Refusal | None = None
        limit: int | None = None  # set at the first read of the body
        received = 0
        response_started = False

        async def checked_receive() -> Message:
            nonlocal refusal, limit, received
            if refusal is not None:
                raise Refused
            if limit is None:
                refusal, limit = self.limits.check_before_reading(scope)
                if refusal is not None:
                    raise Refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refusal = Refusal(413, too_large(limit), "request_too_large")
                    raise Refused
            return message

        async def send_out(message: Message) -> None:
            """What reaches the server: the status noted, the key's rate-limit headers added at the start."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                state = scope.get("state", {}).get(RATE_STATE)
                if state is not None:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    extra = [(name.encode(), value.encode()) for name, value in state.headers().items()
                             if name.encode() not in present]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None and not response_started:
                return  # whatever the app makes of the refusal, the answer is the one below
            response_started = response_started or message["type"] == "http.response.start"
            await send_out(message)

        try:
            try:
                await self.app(scope, checked_receive, guarded_send)
            except Exception:
                if refusal is None or response_started:
                    raise
            if refusal is not None and not response_started:
                await refusal.response(scope)(scope, receive, send_out)
        finally:
            REQUEST_STARTED.reset(arrival)
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope.get("method", "")
            series(HTTP_REQUESTS, route, method, str(status)).inc()
            series(HTTP_SECONDS, route, method).observe(time.perf_counter() - started_at)
