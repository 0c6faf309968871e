"""Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/ps``) as an inference backend.

Ollama loads, schedules and unloads its models itself; this backend only speaks its wire format over
one pooled HTTP client. A chat goes to ``/api/chat``; a raw prompt to ``/api/generate`` with
``raw: true``, so Ollama applies no template to what the caller already formatted. Ollama's own
failures (down, timed out, 5xx, 429, a model it does not have although the registry said it does)
are ``UpstreamError``s the router may cover with a fallback; what Ollama refuses as the caller's
mistake (400) is the caller's ``InvalidRequest``, in Ollama's words.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import anyio
import orjson

from afina.core.errors import InvalidRequest
from afina.gateway.inference.base import (
    OLLAMA_BACKEND,
    Embeddings,
    Generation,
    GenerationRequest,
    LoadedModel,
    ServedModel,
    TextDelta,
    UpstreamError,
    refuse_token_level,
    retry_after_seconds,
)
from afina.gateway.inference.http1 import (
    DRAIN_AFTER_LAST_S,
    JSON_HEADERS,
    ConnectFailed,
    Http1Client,
    Response,
    TransportError,
)

HEALTH_TIMEOUT_S = 2.0
READ_BUFFER_BYTES = 2**24  # one NDJSON line may be this long (a ``done`` line of /api/generate may carry ``context``)
# an expiry this far ahead is a negative keep_alive (Go's time.Duration(math.MaxInt64), some 292 years): no expiry
FOREVER_AFTER_S = 100 * 365 * 24 * 3600.0
# Sampling's names where Ollama's options differ
_OPTION_NAMES = {"max_tokens": "num_predict"}
# Options.FromMap's refusal of a wrongly typed option, which Ollama answers with 500 (handleScheduleError's
# default) though the request is at fault
_OPTION_TYPE_ERROR = re.compile(r'^option "[^"]+" must be of ')


class OllamaBackend:
    """One Ollama server, reached over a pooled ``Http1Client`` (``http1.py``): the client of the proxied path
    (measured on the OpenAI-compatible upstream at ~60 µs of CPU a request, aiohttp's ~150; httpx's was not
    measured). ``timeout_s`` bounds each wait for bytes (to the first byte of an answer, then between stream lines),
    ``connect_timeout_s`` each connection's opening."""

    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float = 5.0,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self._client = Http1Client(self.base_url, headers=self.headers, connect_timeout_s=connect_timeout_s,
                                   read_timeout_s=timeout_s, max_line_bytes=READ_BUFFER_BYTES)

    @property
    def client(self) -> Http1Client:
        """The pooled client; it opens connections on use (again after ``close``)."""
        return self._client

    # --- generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        refuse_token_level(request)  # Ollama's API reports none
        path, body = _generation_body(request, stream=False)
        answer = await self._post_json(path, body)
        return _generation(answer, _content(answer))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        """The pieces of Ollama's NDJSON lines, then the totals of its last (``done``) line. The response is
        closed when the caller closes this early, and Ollama stops generating when its client goes away."""
        refuse_token_level(request)
        path, body = _generation_body(request, stream=True)
        pieces: list[str] = []
        final: dict[str, Any] | None = None
        with _transport_errors(path):
            response = await self._client.stream("POST", path, orjson.dumps(body), JSON_HEADERS)
            try:
                if response.status != 200:
                    raise _refusal(response.status, response.headers, await response.read(), path)
                async for line in response.lines():
                    if not line.strip():
                        continue
                    chunk = _decode(line, path)
                    if "error" in chunk:
                        raise UpstreamError(f"Ollama failed in the middle of {path}: {chunk['error']}")
                    piece = _content(chunk)
                    if piece:
                        pieces.append(piece)
                        yield TextDelta(piece)
                    if chunk.get("done"):
                        final = chunk
                        break
                # the body's end is usually a packet behind the done line: read to it, so the connection goes back
                await response.drain(DRAIN_AFTER_LAST_S)
            finally:
                with anyio.CancelScope(shield=True):
                    # read to its end: back to the pool; else closed, which is how Ollama learns to stop
                    await response.aclose()
        if final is None:
            raise UpstreamError(f"Ollama ended {path} without its last (done) line")
        yield _generation(final, "".join(pieces))

    # --- embeddings, housekeeping ----------------------------------------------------------------

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        body: dict[str, Any] = {"model": _ollama_name(model), "input": inputs, "truncate": truncate}
        if keep_alive_s is not None:
            body["keep_alive"] = keep_alive_s
        answer = await self._post_json("/api/embed", body)
        return Embeddings(vectors=answer.get("embeddings") or [],
                          prompt_tokens=int(answer.get("prompt_eval_count") or 0),
                          load_ns=int(answer.get("load_duration") or 0))

    async def loaded(self) -> list[LoadedModel]:
        with _transport_errors("/api/ps"):
            response = await self._client.request("GET", "/api/ps")
        return [LoadedModel(model=ServedModel(name=entry["name"], backend=OLLAMA_BACKEND, upstream_model=entry["name"]),
                            size=int(entry.get("size") or 0), expires_at=_expiry(entry.get("expires_at")))
                for entry in _checked_json(response, "/api/ps").get("models") or []]

    async def unload(self, model: ServedModel) -> None:
        """Ollama's unload form of ``/api/generate``; a model Ollama does not have is not loaded either."""
        with _transport_errors("/api/generate"):
            response = await self._client.request(
                "POST", "/api/generate", orjson.dumps({"model": _ollama_name(model), "keep_alive": 0}), JSON_HEADERS)
        if response.status != 404:
            _checked_json(response, "/api/generate")

    async def health(self) -> bool:
        """Whether Ollama answers ``/api/version`` now (within ``HEALTH_TIMEOUT_S``)."""
        try:
            response = await self._client.request("GET", "/api/version", timeout_s=HEALTH_TIMEOUT_S)
        except (TransportError, TimeoutError):
            return False
        return response.status == 200

    async def close(self) -> None:
        """Close the pooled connections (Ollama's models are Ollama's to unload); the next call opens new ones."""
        await self._client.close()

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with _transport_errors(path):
            response = await self._client.request("POST", path, orjson.dumps(body), JSON_HEADERS)
        return _checked_json(response, path)


# --- the wire format -----------------------------------------------------------------------------------------

def _ollama_name(model: ServedModel) -> str:
    """The model's name inside Ollama (the public name when the registry gave none)."""
    return model.upstream_model or model.name


def _generation_body(request: GenerationRequest, *, stream: bool) -> tuple[str, dict[str, Any]]:
    """The endpoint and body for a request: a chat, or a raw prompt Ollama must not template."""
    body: dict[str, Any] = {"model": _ollama_name(request.model), "stream": stream}
    if request.messages is not None:
        path, body["messages"] = "/api/chat", request.messages
    else:
        path, body["prompt"], body["raw"] = "/api/generate", request.prompt, True
    options = {_OPTION_NAMES.get(name, name): value for name, value in request.sampling.set_fields().items()}
    if request.num_ctx is not None:
        options["num_ctx"] = request.num_ctx
    if options:
        body["options"] = options
    if request.output_format is not None:
        schema = request.output_format.schema
        body["format"] = schema if request.output_format.kind == "json_schema" and schema else "json"
    if request.keep_alive_s is not None:
        body["keep_alive"] = request.keep_alive_s  # a number is seconds to Ollama
    return path, body


def _content(chunk: dict[str, Any]) -> str:
    """The text of a chat chunk (``message.content``) or a generate chunk (``response``)."""
    if "message" in chunk:
        return str((chunk["message"] or {}).get("content") or "")
    return str(chunk.get("response") or "")


def _generation(final: dict[str, Any], text: str) -> Generation:
    """A ``Generation`` from Ollama's last line (its counts and nanosecond durations)."""
    return Generation(text=text, finish_reason="length" if final.get("done_reason") == "length" else "stop",
                      prompt_tokens=int(final.get("prompt_eval_count") or 0),
                      completion_tokens=int(final.get("eval_count") or 0),
                      load_ns=int(final.get("load_duration") or 0),
                      prompt_eval_ns=int(final.get("prompt_eval_duration") or 0),
                      eval_ns=int(final.get("eval_duration") or 0))


def _expiry(text: str | None) -> float | None:
    """``expires_at`` (RFC 3339) in epoch seconds; None for "never" (Go's zero time, or centuries ahead)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
    return None if moment <= 0 or moment - time.time() > FOREVER_AFTER_S else moment


# --- errors ----------------------------------------------------------------------------------------------------

@contextmanager
def _transport_errors(path: str) -> Iterator[None]:
    """Ollama not reachable or too slow: an ``UpstreamError`` (504 for a timeout) a fallback may cover."""
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamError(f"Ollama did not answer {path} in time ({type(exc).__name__})", status=504) from None
    except TransportError as exc:
        kind = "ConnectError" if isinstance(exc, ConnectFailed) else type(exc).__name__
        raise UpstreamError(f"Ollama is not reachable for {path}: {kind}: {exc}") from None


def _checked_json(response: Response, path: str) -> dict[str, Any]:
    if response.status != 200:
        raise _refusal(response.status, response.headers, response.body, path)
    return _decode(response.body, path)


def _decode(data: bytes, path: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"Ollama answered {path} with something that is not JSON: {_text(data)[:200]!r}") from None
    if not isinstance(value, dict):
        raise UpstreamError(f"Ollama answered {path} with JSON that is not an object: {_text(data)[:200]!r}")
    return value


def _refusal(status: int, headers: dict[str, str], body: bytes, path: str) -> Exception:
    """What a non-200 answer means: the caller's mistake (400, or a wrongly typed option, which Ollama answers
    with 500) is an ``InvalidRequest`` in Ollama's words; anything else is Ollama's failure, an ``UpstreamError``
    (429 with its ``Retry-After``; a 404 means the registry and Ollama disagree about a model: 502)."""
    message = _error_text(body)
    if status == 400 or (status == 500 and _OPTION_TYPE_ERROR.match(message)):
        code = "context_length_exceeded" if "exceeds the context length" in message else None
        return InvalidRequest(message, code=code)
    where = f"Ollama answered {path} with {status}: {message}"
    if status == 429:
        return UpstreamError(where, status=429, retry_after=retry_after_seconds(headers.get("retry-after")))
    return UpstreamError(where)


def _error_text(body: bytes) -> str:
    """Ollama's ``{"error": "..."}``, or the body as is from whatever else answered (a proxy's page)."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    return str(error) if error else _text(body)[:500].strip()


def _text(body: bytes) -> str:
    return body.decode(errors="replace")


