"""Bad requests to the proxied inference routes answer exactly as they did when FastAPI's handler answered them.

``data/inference_answers.json`` holds, for every case below on every inference path, the status, the headers
and the body bytes the gateway answered before the raw-ASGI fast path (``serving/fast_path.py``) existed; the
tests send the same requests now and compare byte for byte. The cases pin the order of the checks too (a body
that is not JSON from a key without the scope: which error wins). ``data/inference_openapi.json`` is the
inference operations' part of the API's document, with every schema they refer to, from the same code.

To record both again (only when an answer is meant to change): ``AFINA_RECORD_ANSWERS=1 pytest`` this file.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from afina.core.db import repository as repo
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.app import create_app

DATA = Path(__file__).parent / "data"
ANSWERS = DATA / "inference_answers.json"
OPENAPI = DATA / "inference_openapi.json"
RECORD = os.environ.get("AFINA_RECORD_ANSWERS") == "1"
JSON_LIMIT = 4096
CLOCK = 1_800_000_015.0  # 15 s into a rate-limit window: the x-ratelimit-reset-* headers say 45s
UNKNOWN = "no-such-model"

# a body each path accepts, but for a model no tenant has
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": UNKNOWN, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": UNKNOWN, "prompt": "hi"},
    "/v1/embeddings": {"model": UNKNOWN, "input": "hi"},
    "/api/chat": {"model": UNKNOWN, "messages": [{"role": "user", "content": "hi"}]},
    "/api/generate": {"model": UNKNOWN, "prompt": "hi"},
    "/api/embed": {"model": UNKNOWN, "input": "hi"},
    "/api/embeddings": {"model": UNKNOWN, "prompt": "hi"},
}
PATHS = list(BODIES)
JSON_TYPE = {"content-type": "application/json"}


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


def _with(path: str, **fields: Any) -> bytes:
    return _json({**BODIES[path], **fields})


# case → (key kind, extra headers, query string, body for a path); a key kind is one of the ``keys`` fixture's
CASES: dict[str, tuple[str, dict[str, str], str, Any]] = {
    "missing key": ("none", JSON_TYPE, "", lambda path: _with(path)),
    "malformed authorization": ("malformed", JSON_TYPE, "", lambda path: _with(path)),
    "unknown key": ("unknown", JSON_TYPE, "", lambda path: _with(path)),
    "key without the inference scope": ("fine_tune_only", JSON_TYPE, "", lambda path: _with(path)),
    "unknown model": ("good", JSON_TYPE, "", lambda path: _with(path)),
    "unknown model, streamed": ("good", JSON_TYPE, "", lambda path: _with(path, stream=True)),
    "unknown model, an end user named": ("good", {**JSON_TYPE, "x-afina-user": "u-1"}, "",
                                        lambda path: _with(path)),
    "invalid JSON": ("good", JSON_TYPE, "", lambda path: b'{"model": "m", '),
    "invalid JSON from a key without the scope": ("fine_tune_only", JSON_TYPE, "", lambda path: b"{nope"),
    "invalid JSON from an unknown key": ("unknown", JSON_TYPE, "", lambda path: b"[1, 2"),
    "a body field of the wrong type": ("good", JSON_TYPE, "", lambda path: _with(path, model=["a", "b"])),
    "wrong types from a key without the scope": ("fine_tune_only", JSON_TYPE, "",
                                                 lambda path: _with(path, model=["a"])),
    "two wrong fields": ("good", JSON_TYPE, "", lambda path: _with(path, model=1, stream="maybe")),
    "a required field missing": ("good", JSON_TYPE, "", lambda path: _json({"stream": False})),
    "an empty body": ("good", JSON_TYPE, "", lambda path: b""),
    "a JSON array": ("good", JSON_TYPE, "", lambda path: b"[]"),
    "JSON null": ("good", JSON_TYPE, "", lambda path: b"null"),
    "no content type": ("good", {}, "", lambda path: _with(path)),
    "a text/plain body": ("good", {"content-type": "text/plain"}, "", lambda path: _with(path)),
    "json with a charset and a suffix": ("good", {"content-type": "application/vnd.x+json; charset=utf-8"}, "",
                                         lambda path: _with(path)),
    "a UTF-16 body": ("good", JSON_TYPE, "", lambda path: json.dumps(BODIES[path]).encode("utf-16")),
    "a UTF-8 BOM": ("good", JSON_TYPE, "", lambda path: b"\xef\xbb\xbf" + _with(path)),
    "invalid UTF-8": ("good", JSON_TYPE, "", lambda path: b'{"model": "\xff\xfe"}'),
    "NaN and a duplicate key": ("good", JSON_TYPE, "",
                                lambda path: _with(path)[:-1] + b', "model": "other", "temperature": NaN}'),
    "a NUL in a query parameter": ("good", JSON_TYPE, "q=a%00b", lambda path: _with(path)),
    "a NUL in a query parameter from a key without the scope": ("fine_tune_only", JSON_TYPE, "x=%00",
                                                               lambda path: _with(path)),
    "a NUL in the model": ("good", JSON_TYPE, "", lambda path: _with(path, model="a\u0000b")),
    "a harmless query string": ("good", JSON_TYPE, "a=1&b=2", lambda path: _with(path)),
    "an oversized body by content-length": ("good", {**JSON_TYPE, "content-length": str(JSON_LIMIT + 1)}, "",
                                            lambda path: b" " * (JSON_LIMIT + 1)),
    "an oversized chunked body": ("good", JSON_TYPE, "", lambda path: iter([b" " * 1024] * 8)),
    "an oversized body from a key without the scope": ("fine_tune_only", JSON_TYPE, "",
                                                      lambda path: iter([b" " * 1024] * 8)),
    "the client gone while sending its body": ("good", JSON_TYPE, "", lambda path: iter([b'{"model": ', None])),
}


@pytest.fixture(scope="module")
def recorded() -> Iterator[dict[str, Any]]:
    """The answers recorded before; when recording, the dict the tests fill, written at the end."""
    if RECORD:
        answers: dict[str, Any] = {}
        yield answers
        ANSWERS.write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")
    else:
        yield json.loads(ANSWERS.read_text())


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    settings = Settings(home=tmp_path_factory.mktemp("gateway"), log_json=False, database_url=None,
                        broker_url=None, store_backend="local", work_dir=None, environment="local",
                        max_json_body_bytes=JSON_LIMIT)
    gateway = create_app(Runtime(settings))
    gateway.state.rate_limiter.clock = lambda: CLOCK
    return gateway


def _key(app: FastAPI, **options: Any) -> str:
    with app.state.runtime.db.session() as session:
        return repo.create_api_key(session, "acme", **options)


def _authorization(app: FastAPI, kind: str) -> dict[str, str]:
    if kind == "none":
        return {}
    if kind == "malformed":
        return {"authorization": "Token abc"}
    if kind == "unknown":
        return {"authorization": "Bearer afk-unknownunknownunknown"}
    if kind == "fine_tune_only":
        return {"authorization": f"Bearer {_key(app, scopes=['fine-tune'])}"}
    return {"authorization": f"Bearer {_key(app, requests_per_minute=50, tokens_per_minute=100_000)}"}


def send(app: FastAPI, path: str, headers: dict[str, str], query: str,
         body: bytes | Iterator[bytes | None]) -> dict[str, Any]:
    """One request through the app's ASGI interface, its body in one piece or chunked (None: the client leaves
    there); (status, headers in order, body text) as recorded."""
    if isinstance(body, bytes) and "content-length" not in headers:
        headers = {**headers, "content-length": str(len(body))}
    pending = [body] if isinstance(body, bytes) else list(body)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)  # a real client's bytes arrive over time: let the loop run
        if not pending:
            await asyncio.sleep(3600)  # a client waiting for the answer
        chunk = pending.pop(0)
        if chunk is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send_message(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query.encode(),
             "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send_message), timeout=30))
    start = next(message for message in sent if message["type"] == "http.response.start")
    payload = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return {"status": start["status"],
            "headers": [[name.decode(), value.decode()] for name, value in start.get("headers", [])],
            "body": payload.decode("utf-8", errors="replace")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_a_bad_request_answers_as_before(app: FastAPI, recorded: dict[str, Any], path: str, case: str) -> None:
    kind, headers, query, body = CASES[case]
    answer = send(app, path, {**_authorization(app, kind), **headers}, query, body(path))
    name = f"{path} {case}"
    if RECORD:
        recorded[name] = answer
        return
    assert answer == recorded[name]


@pytest.mark.parametrize("path", PATHS)
def test_a_rate_limited_key_answers_as_before(app: FastAPI, recorded: dict[str, Any], path: str) -> None:
    """A key of 2 requests per minute: two answers (404, with the x-ratelimit-* headers), then the 429."""
    headers = {"authorization": f"Bearer {_key(app, requests_per_minute=2)}", **JSON_TYPE}
    answers = [send(app, path, headers, "", _with(path)) for _ in range(3)]
    invalid = send(app, path, headers, "", b"{not json")  # the body is parsed before the key is counted
    answers.append(invalid)
    name = f"{path} rate limited"
    if RECORD:
        recorded[name] = answers
        return
    assert answers == recorded[name]
    assert [answer["status"] for answer in answers] == [404, 404, 429, 400]


def _inference_document(app: FastAPI) -> dict[str, Any]:
    document = app.openapi()
    paths = {path: document["paths"][path] for path in PATHS if path in document["paths"]}
    schemas = document["components"]["schemas"]
    wanted: dict[str, Any] = {}
    pending = [paths]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in wanted:
                    wanted[name] = schemas[name]
                    pending.append(schemas[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return {"paths": paths, "schemas": dict(sorted(wanted.items()))}


def test_the_inference_operations_are_documented_as_before(app: FastAPI) -> None:
    document = json.dumps(_inference_document(app), indent=1) + "\n"
    if RECORD:
        OPENAPI.write_text(document)
        return
    assert document == OPENAPI.read_text()
    assert set(json.loads(document)["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
