"""The gateway's FastAPI application, built by ``create_app`` (nothing happens at import).

``uvicorn --factory afina.gateway.app:create_app`` serves it with settings from the
environment; tests pass a ``Runtime`` of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, FastAPI, Response
from fastapi.telemetry import TelemetryConfig

from afina.core.logging import configure_logging, log_event
from afina.core.metrics import render_latest
from afina.core.runtime import Runtime
from afina.core.scratch import sweep_stale_scratch
from afina.core.settings import get_settings
from afina.gateway.batches.router import router as batches_router
from afina.gateway.captures.router import router as captures_router
from afina.gateway.chat.router import router as chat_router
from afina.gateway.completions.router import router as completions_router
from afina.gateway.embeddings.router import router as embeddings_router
from afina.gateway.errors import install_error_handlers, log
from afina.gateway.evaluations.router import router as evaluations_router
from afina.gateway.fast_path import InferenceFastPath, fast_routes
from afina.gateway.files.router import router as files_router
from afina.gateway.fine_tuning.router import router as fine_tuning_router
from afina.gateway.middleware import GatewayMiddleware
from afina.gateway.models.router import router as models_router
from afina.gateway.ollama.router import root_router as ollama_root_router
from afina.gateway.ollama.router import router as ollama_router
from afina.gateway.routes.router import router as routes_router
from afina.gateway.serving.stack import build_serving

VERSION = "0.1.0"
# FastAPI's native OpenTelemetry off (``Settings.gateway_opentelemetry``): otherwise every request asks the global
# providers whether one is configured (afina's metrics are Prometheus; nothing configures one by default)
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
# the routers every proxied request takes: matched first (``match_first``), and those of their routes whose only
# inputs are a JSON body and ``deps.inference_call`` answered by ``fast_path.InferenceFastPath``
PROXIED_ROUTERS: tuple[APIRouter, ...] = (chat_router, completions_router, embeddings_router, ollama_router)


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """A gateway on ``runtime`` (by default one built from the environment's settings)."""
    if runtime is None:  # ``uvicorn --factory``: the process is the gateway's, and so is its logging
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_json)
        runtime = Runtime(settings)
    stack = build_serving(runtime)
    dispatcher, registry, rate_limiter = stack.dispatcher, stack.registry, stack.rate_limiter

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(lambda: runtime.db)  # opening the database migrates it
        await to_thread.run_sync(sweep_stale_scratch, runtime.settings)  # spools a crashed gateway left
        log_event(log, "gateway.started", backend=runtime.settings.inference_backend)
        try:
            yield
        finally:
            await stack.close()
            log_event(log, "gateway.stopped")

    # the API's own map (/docs, /redoc, /openapi.json) only where the operator wants it: local mode, or
    # AFINA_EXPOSE_DOCS=true; off, each answers 404 like any unknown path
    docs = runtime.settings.docs_enabled
    app = FastAPI(title="afina gateway", version=VERSION, lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning and inference API; Ollama's native API under /api",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None,
                  telemetry=None if runtime.settings.gateway_opentelemetry else TELEMETRY_OFF)
    app.state.runtime = runtime
    app.state.dispatcher = dispatcher
    app.state.registry = registry
    app.state.rate_limiter = rate_limiter
    install_error_handlers(app)
    # innermost first: the proxied routes answered without FastAPI's handler (same checks, same answers), then
    # around it metrics, x-ratelimit-* headers, and the key and body size before the body is read: one layer
    app.add_middleware(InferenceFastPath, routes=fast_routes(PROXIED_ROUTERS))
    app.add_middleware(GatewayMiddleware, settings=runtime.settings)
    # captures before routes: see its router
    for router in (files_router, batches_router, fine_tuning_router, evaluations_router, models_router, chat_router,
                   completions_router, embeddings_router, captures_router, routes_router):
        app.include_router(router)
    # Ollama's API has no OpenAPI document of its own; afina's would only restate docs/api.md
    app.include_router(ollama_router, include_in_schema=False)
    app.include_router(ollama_root_router)

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, str]:
        """Liveness only: answers while the process serves HTTP (no key needed)."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    def metrics() -> Response:
        body, content_type = render_latest()
        return Response(body, media_type=content_type)

    match_first(app, PROXIED_ROUTERS)
    return app


def match_first(app: FastAPI, routers: tuple[APIRouter, ...]) -> None:
    """Try ``routers``' routes before the others: the ones every proxied request takes. A request is matched
    against the app's routes in order, each tried costing a regex and FastAPI's bookkeeping, and the inference
    routes were declared after most others. Their paths are fixed and no other route matches them (a test checks),
    so every request still lands where it did; the API's document keeps listing the routes as they were declared.
    """
    declared = list(app.router.routes)
    first_ids = {id(route) for route in declared if _included_from(route, routers)}
    app.router.routes[:] = [*(route for route in declared if id(route) in first_ids),
                            *(route for route in declared if id(route) not in first_ids)]
    declared_ids = {id(route) for route in declared}
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # routes added after this (a test's own) come last, as they would have
        matched = app.router.routes
        app.router.routes = [*declared, *(route for route in matched if id(route) not in declared_ids)]
        try:
            return generate()
        finally:
            app.router.routes = matched

    app.openapi = openapi  # type: ignore[method-assign]


def _included_from(route: object, routers: tuple[APIRouter, ...]) -> bool:
    original = getattr(route, "original_router", None)  # FastAPI keeps an included router whole
    if original is not None:
        return any(original is router for router in routers)
    endpoint = getattr(route, "endpoint", None)  # or, in older versions, copies its routes
    return endpoint is not None and any(endpoint is getattr(own, "endpoint", None)
                                        for router in routers for own in router.routes)
