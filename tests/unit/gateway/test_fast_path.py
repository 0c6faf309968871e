"""The raw-ASGI path of the proxied routes (``fast_path``): which routes it takes, that it answers them without
FastAPI's handler, that what it does not take still reaches FastAPI's route, and that reading a body with
pydantic's JSON parser gives what FastAPI's ``json.loads`` and validation gave. What it answers to bad requests is
compared with the answers of the code before it in ``test_inference_answers.py``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY
from pydantic import BaseModel

from afina.core.db import repository as repo
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.app import PROXIED_ROUTERS, create_app
from afina.gateway.chat.protocol import ChatCompletionRequest
from afina.gateway.completions.protocol import CompletionRequest
from afina.gateway.deps import InferenceCallDep, TenantDep
from afina.gateway.embeddings.protocol import EmbeddingRequest
from afina.gateway.fast_path import fast_routes
from afina.gateway.ollama.protocol import ChatRequest, EmbeddingsRequest, EmbedRequest, GenerateRequest

PROXIED = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
           ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/embeddings")}


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(Runtime(Settings(home=tmp_path, log_json=False, database_url=None, broker_url=None,
                                       store_backend="local", work_dir=None, environment="local")))


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]], app: FastAPI | None = None) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 5000),
                             "server": ("127.0.0.1", 8000)}
    if app is not None:
        scope["app"] = app
    return scope


def test_the_fast_path_takes_exactly_the_generating_and_embedding_routes() -> None:
    assert set(fast_routes(PROXIED_ROUTERS)) == PROXIED


def test_a_route_with_other_inputs_or_a_body_to_serialise_is_left_to_fastapi() -> None:
    router = APIRouter()

    @router.post("/dict")
    async def returns_a_dict(body: EmbeddingRequest, call: InferenceCallDep) -> dict[str, str]:
        return {}

    @router.post("/tenant")
    async def other_dependency(body: EmbeddingRequest, tenant: TenantDep) -> Response:
        return Response()

    @router.post("/query")
    async def with_a_query_parameter(body: EmbeddingRequest, call: InferenceCallDep, q: str = "") -> Response:
        return Response()

    @router.post("/{name}")
    async def with_a_path_parameter(name: str, body: EmbeddingRequest, call: InferenceCallDep) -> Response:
        return Response()

    @router.post("/taken", response_model=None)
    async def taken(body: EmbeddingRequest, call: InferenceCallDep) -> JSONResponse | Response:
        return Response()

    assert set(fast_routes([router])) == {("POST", "/taken")}


def test_each_route_it_takes_is_the_one_fastapi_routes_to(app: FastAPI) -> None:
    """The same route object (its metrics label and body limit), found as FastAPI's router finds it."""
    for (method, path), fast in fast_routes(PROXIED_ROUTERS).items():
        chosen: dict[str, Any] = {}

        async def handle(scope: dict[str, Any], receive: Any, send: Any, chosen: dict[str, Any] = chosen) -> None:
            chosen["route"] = scope["route"]

        original = fast.route.handle
        fast.route.handle = handle  # type: ignore[method-assign]
        try:
            asyncio.run(app.router(_scope(method, path, [], app), None, None))  # type: ignore[arg-type]
        finally:
            fast.route.handle = original  # type: ignore[method-assign]
        assert chosen["route"] is fast.route, (method, path)


def _requests_counted(route: str, status: str) -> float:
    return REGISTRY.get_sample_value("afina_http_requests_total",
                                     {"route": route, "method": "POST", "status": status}) or 0.0


def _post(app: FastAPI, path: str, body: bytes, headers: dict[str, str]) -> int:
    sent: list[dict[str, Any]] = []
    pending = [body]

    async def receive() -> dict[str, Any]:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    asyncio.run(asyncio.wait_for(app(_scope("POST", path, raw), receive, send), timeout=30))
    return next(message["status"] for message in sent if message["type"] == "http.response.start")


@pytest.mark.parametrize("path", sorted(path for _, path in PROXIED))
def test_a_valid_body_is_answered_without_fastapis_handler_and_a_bad_one_by_it(app: FastAPI, path: str,
                                                                                monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    with app.state.runtime.db.session() as session:
        key = repo.create_api_key(session, "acme")
    fast = fast_routes(PROXIED_ROUTERS)[("POST", path)]
    handled: list[str] = []
    original = fast.route.handle

    async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
        handled.append(scope["path"])
        await original(scope, receive, send)

    monkeypatch.setattr(fast.route, "handle", counted)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}
    counted_before = _requests_counted(path, "404")
    assert _post(app, path, json.dumps(body).encode(), headers) == 404
    assert handled == []  # the fast path answered
    assert _requests_counted(path, "404") == counted_before + 1  # by its route template, as FastAPI's were
    assert _post(app, path, b"{not json", headers) == 400
    assert handled == [path]  # FastAPI's route did
    assert _post(app, path, json.dumps(body).encode(), {**headers, "content-type": "text/plain"}) == 400
    assert handled == [path, path]


# bodies the official clients and the tests send, with every kind of field the models have
VALID: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                             "temperature": 0.5, "top_p": 1, "max_tokens": 16, "stop": ["\n"], "seed": 7, "n": 1,
                             "stream": True, "stream_options": {"include_usage": True}, "user": "u",
                             "response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "x", "schema": {"type": "object"}}},
                             "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.1, "frequency_penalty": 0,
                             "logit_bias": {"50256": -100}, "metadata": {"a": "b"}, "unknown_field": [1, {"x": None}]}),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "é ✓ \u2028"}], "stop": "x",
                             "max_completion_tokens": 5, "response_format": {"type": "json_object"}}),
    (CompletionRequest, {"model": "m", "prompt": ["a", "b"], "max_tokens": 3, "echo": False, "logprobs": 2,
                         "suffix": None, "stream": False, "temperature": 1.0}),
    (CompletionRequest, {"model": "m", "prompt": "a"}),
    (EmbeddingRequest, {"model": "m", "input": ["a", "b"], "encoding_format": "float", "user": "u"}),
    (EmbeddingRequest, {"model": "m", "input": "a"}),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi", "images": []}], "stream": False,
                   "format": {"type": "object", "properties": {"a": {"type": "string"}}}, "keep_alive": "5m",
                   "options": {"temperature": 0.2, "num_predict": 8, "stop": ["x"], "seed": 1, "num_ctx": 512,
                               "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}}),
    (ChatRequest, {"model": "m", "messages": [], "keep_alive": 0}),
    (GenerateRequest, {"model": "m", "prompt": "hi", "system": "s", "format": "json", "raw": False, "stream": True,
                       "options": {"num_predict": 4}}),
    (EmbedRequest, {"model": "m", "input": ["a"], "truncate": True, "keep_alive": -1}),
    (EmbeddingsRequest, {"model": "m", "prompt": "a"}),
]


@pytest.mark.parametrize(("model", "body"), VALID, ids=lambda value: getattr(value, "__name__", ""))
def test_reading_a_body_from_its_bytes_gives_what_fastapi_gave(model: type[BaseModel], body: dict[str, Any]) -> None:
    """FastAPI parsed with ``json.loads`` and validated the objects; the fast path validates the bytes."""
    raw = json.dumps(body, ensure_ascii=False).encode()
    try:
        expected = model.model_validate(json.loads(raw), from_attributes=True)
    except Exception as exc:  # a body the models refuse is not a case of this test
        pytest.fail(f"{model.__name__} refuses {body}: {exc}")
    read = model.model_validate_json(raw)
    assert read == expected
    assert read.model_dump(mode="json") == expected.model_dump(mode="json")
    assert read.model_fields_set == expected.model_fields_set
