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
