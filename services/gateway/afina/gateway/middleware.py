"""Request metrics by route template (``/v1/files/{file_id}``, never the raw path: ids would explode
the label set)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.core.metrics import HTTP_REQUESTS, HTTP_SECONDS

UNMATCHED = "unmatched"


class MetricsMiddleware:
    """Pure ASGI, so streamed responses are timed to their last byte and never buffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
            HTTP_SECONDS.labels(route=route, method=method).observe(time.perf_counter() - started)


RATE_STATE = "rate_limit"  # the key's RateState, put on request.state by the ``rate_limited`` dependency


class RateLimitHeadersMiddleware:
    """Adds a key's ``x-ratelimit-*`` headers to every answer of a rate-limited route (a refusal carries them
    itself), streamed or not: at the response's start, whatever built it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            state = scope.get("state", {}).get(RATE_STATE)
            if message["type"] == "http.response.start" and state is not None:
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name.encode(), value.encode()) for name, value in state.headers().items()
                         if name.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
