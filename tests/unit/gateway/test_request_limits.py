"""Limits the gateway checks before it reads a request body: a key must be sent (401), a body must fit (413),
and an upload's form fields are bounded in number and size.

Requests go straight to the ASGI app with a ``receive`` that records what was read, so each test can
say how much of the body the gateway consumed before it answered.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from afina.core.db import repository as repo
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.app import create_app
from afina.gateway.deps import TenantDep

JSON_LIMIT = 64 * 1024
CHUNK = 16 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    body_bytes_read: int
    receive_calls: int


@dataclass
class _Body:
    chunks: Iterator[bytes]
    read: int = 0
    calls: int = 0
    done: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)


def call(app: FastAPI, method: str, path: str, *, headers: dict[str, str] | None = None,
         chunks: Iterator[bytes] | None = None) -> Answer:
    """One request through the ASGI interface; the body comes from ``chunks`` (chunked, no Content-Length
    unless ``headers`` gives one)."""
    body = _Body(chunks or iter(()))

    async def receive() -> dict[str, Any]:
        body.calls += 1
        if body.done:
            await asyncio.sleep(3600)  # like a client that waits for the answer
        await asyncio.sleep(0)  # a real client's bytes arrive over time: let the loop run
        chunk = next(body.chunks, None)
        if chunk is None:
            body.done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        body.read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        body.sent.append(message)

    raw_headers = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": raw_headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    start = next(message for message in body.sent if message["type"] == "http.response.start")
    payload = b"".join(message.get("body", b"") for message in body.sent if message["type"] == "http.response.body")
    response_headers = {name.decode(): value.decode() for name, value in start.get("headers", [])}
    parsed = json.loads(payload) if response_headers.get("content-type", "").startswith("application/json") \
        else payload
    return Answer(start["status"], response_headers, parsed, body.read, body.calls)


def large_body(total: int = 16 * JSON_LIMIT) -> Iterator[bytes]:
    """A body far over the limit, in chunks (finite, so a gateway that reads it all still answers)."""
    for _ in range(total // CHUNK):
        yield b" " * CHUNK


class Echo(BaseModel):
    text: str


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    settings = Settings(home=tmp_path, log_json=False, database_url=None, broker_url=None, store_backend="local",
                        work_dir=None, max_json_body_bytes=JSON_LIMIT, max_upload_bytes=256 * 1024,
                        max_form_fields=3, max_form_field_bytes=1024)
    gateway = create_app(Runtime(settings))

    # an Ollama-style route, as /api/* endpoints are written: its errors must come in Ollama's shape
    @gateway.post("/api/echo")
    def echo(body: Echo, tenant: TenantDep) -> dict[str, str]:
        return {"text": body.text, "tenant": tenant}

    return gateway


@pytest.fixture
def api_key(app: FastAPI) -> str:
    with app.state.runtime.db.session() as session:
        return repo.create_api_key(session, "acme")


def api_operations(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every operation of the API (``/v1`` and ``/api``) in the app's OpenAPI document, so a
    new endpoint is covered without being listed here."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        if path.startswith(("/v1/", "/api/")):
            found.extend((method.upper(), re.sub(r"\{[^}]+\}", "x", path)) for method in operations)
    return found


def test_every_api_operation_answers_401_without_reading_the_body(app: FastAPI) -> None:
    operations = api_operations(app)
    assert ("POST", "/v1/chat/completions") in operations and ("POST", "/v1/files") in operations
    assert ("POST", "/api/echo") in operations
    for method, path in operations:
        answer = call(app, method, path, chunks=large_body())
        assert answer.status == 401, (method, path, answer.body)
        assert answer.body_bytes_read == 0, f"{method} {path} read {answer.body_bytes_read} body bytes before 401"
        assert answer.headers["www-authenticate"] == "Bearer"
        if path.startswith("/api/"):
            assert answer.body == {"error": "missing API key: send 'Authorization: Bearer <key>'"}
        else:
            assert answer.body["error"]["code"] == "invalid_api_key"
            assert answer.body["error"]["message"] == "missing API key: send 'Authorization: Bearer <key>'"


def test_a_malformed_authorization_header_is_401_before_the_body(app: FastAPI) -> None:
    for header in ("Basic dXNlcjpwdw==", "Bearer", "afk-123"):
        answer = call(app, "POST", "/v1/chat/completions", headers={"Authorization": header}, chunks=large_body())
        assert answer.status == 401 and answer.body_bytes_read == 0
        assert "malformed Authorization header" in answer.body["error"]["message"]


def test_public_routes_and_unknown_paths_need_no_key(app: FastAPI) -> None:
    assert call(app, "GET", "/health").status == 200
    assert call(app, "GET", "/metrics").status == 200
    assert call(app, "GET", "/openapi.json").status == 200  # local mode: the docs are on
    missing = call(app, "GET", "/v1/no-such-thing")
    assert missing.status == 404 and missing.body["error"]["code"] == "not_found"


def test_a_json_body_over_the_limit_by_content_length_is_413_unread(app: FastAPI) -> None:
    headers = {"Authorization": "Bearer afk-not-checked-yet", "Content-Type": "application/json",
               "Content-Length": str(JSON_LIMIT + 1)}
    answer = call(app, "POST", "/v1/chat/completions", headers=headers, chunks=large_body())
    assert answer.status == 413 and answer.body_bytes_read == 0
    assert answer.body["error"]["code"] == "request_too_large"
    assert str(JSON_LIMIT) in answer.body["error"]["message"]


def test_a_chunked_json_body_is_cut_off_at_the_limit(app: FastAPI) -> None:
    headers = {"Authorization": "Bearer afk-not-checked-yet", "Content-Type": "application/json"}
    answer = call(app, "POST", "/v1/fine_tuning/jobs", headers=headers, chunks=large_body())
    assert answer.status == 413, answer.body
    assert answer.body["error"]["code"] == "request_too_large"
    assert answer.body_bytes_read <= JSON_LIMIT + CHUNK  # stopped at the chunk that crossed the limit


def test_ollama_routes_answer_413_in_ollama_shape(app: FastAPI, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    answer = call(app, "POST", "/api/echo", headers=headers, chunks=large_body())
    assert answer.status == 413
    assert answer.body == {"error": f"the request body is larger than the limit of {JSON_LIMIT} bytes"}
    small = call(app, "POST", "/api/echo", headers=headers, chunks=iter([b'{"text": "oi"}']))
    assert small.status == 200 and small.body == {"text": "oi", "tenant": "acme"}  # within the limit: served


def test_an_upload_with_a_wrong_key_is_refused_before_its_body_is_read(app: FastAPI, tmp_path: Path) -> None:
    headers = {"Authorization": "Bearer afk-wrong", "Content-Type": "multipart/form-data; boundary=xyz"}
    answer = call(app, "POST", "/v1/files", headers=headers, chunks=large_body())
    assert answer.status == 401 and answer.body["error"]["message"] == "incorrect API key provided"
    assert answer.body_bytes_read == 0
    spool = tmp_path / "work" / "uploads"
    assert not spool.exists() or not any(spool.iterdir())


def _upload(app: FastAPI, api_key: str, fields: dict[str, str]) -> Any:
    with TestClient(app) as client:
        return client.post("/v1/files", headers={"Authorization": f"Bearer {api_key}"}, data=fields,
                           files={"file": ("train.jsonl", b'{"text": "oi"}\n' * 20)})


def test_an_upload_with_too_many_form_fields_is_400(app: FastAPI, api_key: str) -> None:
    fields = {"purpose": "fine-tune", **{f"extra_{index}": "x" for index in range(3)}}  # 4 fields, 3 allowed
    response = _upload(app, api_key, fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "the form has more than 3 fields besides the file"


def test_an_upload_with_a_form_field_over_its_limit_is_413(app: FastAPI, api_key: str) -> None:
    response = _upload(app, api_key, {"purpose": "fine-tune", "ingest_options": " " * 1025})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["param"] == "ingest_options" and error["code"] == "form_field_too_large"
    assert "longer than the limit of 1024 bytes" in error["message"]


def test_an_upload_within_the_form_limits_is_stored(app: FastAPI, api_key: str) -> None:
    response = _upload(app, api_key, {"purpose": "fine-tune", "ingest_options": '{"format": "text"}'})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "train.jsonl"
