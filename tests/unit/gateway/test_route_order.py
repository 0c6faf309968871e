"""The inference routes are matched first (``app.match_first``): every request still lands on the route it did
when they were matched in the order they were declared, and the API's document still lists them in that order."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.routing import Match

from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.app import create_app
from afina.gateway.chat.router import router as chat_router
from afina.gateway.completions.router import router as completions_router
from afina.gateway.embeddings.router import router as embeddings_router
from afina.gateway.ollama.router import router as ollama_router

FIRST = (chat_router, completions_router, embeddings_router, ollama_router)


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(Runtime(Settings(home=tmp_path, log_json=False, database_url=None, broker_url=None,
                                       store_backend="local", work_dir=None, environment="local")))


def _scope(method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [], "app_root_path": ""}


def _first_ones(app: FastAPI) -> list[object]:
    return [route for route in app.router.routes if getattr(route, "original_router", None) in FIRST]


def test_the_inference_routers_are_tried_first(app: FastAPI) -> None:
    first = _first_ones(app)
    assert len(first) == len(FIRST)
    assert app.router.routes[:len(first)] == first


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "HEAD"])
def test_no_other_route_matches_an_inference_path(app: FastAPI, method: str) -> None:
    """Moving them first changes nothing only while their paths are theirs alone (any method: a partial match
    decides a 405 too)."""
    first_ids = {id(route) for route in _first_ones(app)}
    paths = [route.path for router in FIRST for route in router.routes]
    assert paths and all("{" not in path for path in paths)  # fixed paths: the check below covers every request
    for path in paths:
        for route in app.router.routes:
            if id(route) not in first_ids:
                match, _ = route.matches(_scope(method, path))
                assert match == Match.NONE, (method, path, route)


def test_the_document_lists_routes_as_declared(app: FastAPI) -> None:
    paths = list(app.openapi()["paths"])
    assert paths[0] == "/v1/files"
    assert paths.index("/v1/models") < paths.index("/v1/chat/completions") < paths.index("/v1/completions") \
        < paths.index("/v1/embeddings") < paths.index("/v1/routes")
    assert not any(path.startswith("/api/") for path in paths)  # Ollama's API has no document of its own here
