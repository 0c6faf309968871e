"""Any OpenAI-compatible HTTP server as a backend: llama_cpp.server, vLLM, Groq, OpenAI itself.

A request goes out as OpenAI's ``/chat/completions`` (messages) or ``/completions`` (a raw
prompt) and the answer comes back as the gateway's ``Generation``; a stream is read as
server-sent events until ``[DONE]``. One pooled ``Http1Client`` per upstream carries the timeouts and
the API key (registered with the log scrubber, so it never reaches a log line). Its own client (asyncio
protocols and httptools, ``http1.py``) rather than httpx or aiohttp, because this is the path every proxied
request takes: httpx's pool bookkeeping (it polls every pooled socket on each request) cost more CPU than the
rest of the gateway's work together, and aiohttp's client still ~150 µs a request against ~40 µs for the bare
exchange, the largest single cost of a proxied request.

Failures split by whose they are. The upstream's (unreachable, timed out, 5xx, 429, a key or
model it does not know) raise ``UpstreamError``, whose text is for the operator's log and which a
route may cover with its next target. The caller's (any other 4xx) raise ``InvalidRequest`` with
the upstream's own words, scrubbed, so a prompt too long for the model reads as
``context_length_exceeded`` whichever server refused it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson

from afina.core.errors import InvalidRequest
from afina.core.logging import redact, register_secret
from afina.gateway.inference.base import (
    Embeddings,
    Generation,
    GenerationRequest,
    LoadedModel,
    OutputFormat,
    Sampling,
    ServedModel,
    TextDelta,
    TokenLogprobs,
    UpstreamError,
    retry_after_seconds,
)
from afina.gateway.inference.http1 import (
    DRAIN_AFTER_LAST_S,
    JSON_HEADERS,
    ConnectFailed,
    Http1Client,
    TransportError,
)

HEALTH_TIMEOUT_S = 2.0
READ_BUFFER_BYTES = 2**20  # one SSE line may be this long (a large usage or tool-call chunk)
ERROR_TEXT_LIMIT = 500  # characters of an upstream's error body kept in a message
# the ``Sampling`` fields sent, when set: OpenAI's own, and extras llama.cpp's server and vLLM take (a field added
# to ``Sampling`` later stays home until listed here: OpenAI refuses a field it does not know)
OPENAI_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty")
EXTRA_SAMPLING = ("top_k", "min_p", "repeat_penalty")
# 4xx answers that are the upstream's or the operator's business, not a mistake the caller can fix:
# a key it refuses, a model or endpoint it does not have, its own request timeout, its rate limit
NOT_THE_CALLERS = frozenset({401, 403, 404, 408, 429})
_CONTEXT_LENGTH = re.compile(r"(?i)context[ _]?(length|window|size)|maximum context|too many tokens")


class OpenAIUpstream:
    """An ``InferenceBackend`` that forwards each call to an OpenAI-compatible server at ``base_url`` (``…/v1``).

    ``ServedModel.upstream_model`` names the model there (its public name when unset). Nothing is loaded
    here, so ``loaded`` is empty and ``unload`` does nothing; ``num_ctx`` and ``keep_alive_s`` are the
    upstream's to decide. Two flags describe an upstream that is not quite OpenAI: ``schema_in_json_object``
    for llama_cpp.server's dialect of structured output (a schema rides in ``{"type": "json_object",
    "schema": …}``, and its ``/completions``, which takes no ``response_format``, gets the equivalent GBNF
    ``grammar``), and ``stream_usage=False`` for one that refuses ``stream_options`` (its streams are then
    counted one completion token per content chunk, with no prompt count).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 600,
                 connect_timeout_s: float = 5, name: str = "upstream", schema_in_json_object: bool = False,
                 stream_usage: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.schema_in_json_object = schema_in_json_object
        self.stream_usage = stream_usage
        register_secret(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        parts = urlsplit(self.base_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._prefix = parts.path  # the client is the origin's: ``post_json_to`` reaches outside the API's path
        # ``timeout_s`` bounds each wait for bytes (to the first byte of an answer, then between stream chunks)
        self._client = Http1Client(self._origin, headers=self._headers, connect_timeout_s=connect_timeout_s,
                                   read_timeout_s=timeout_s, max_line_bytes=READ_BUFFER_BYTES)

    def __repr__(self) -> str:
        return f"OpenAIUpstream(name={self.name!r}, base_url={self.base_url!r})"

    @property
    def client(self) -> Http1Client:
        """The pooled client; it opens connections on use (again after ``close``)."""
        return self._client

    # --- generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        path, param = _endpoint(request)
        started = time.perf_counter_ns()
        answer = await self._post_json(path, self._body(request, stream=False), param)
        elapsed = time.perf_counter_ns() - started
        choice = _first_choice(answer, self.name)
        text = (choice.get("message") or {}).get("content") if request.messages is not None else choice.get("text")
        usage = answer.get("usage") or {}
        logprobs = TokenLogprobs.from_openai(choice.get("logprobs")) if request.logprobs is not None else None
        if request.logprobs is not None and logprobs is None:
            raise UpstreamError(f"upstream {self.name}: asked for logprobs, answered none", status=502)
        return Generation(text=text or "", finish_reason=_finish(choice.get("finish_reason")),
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0), eval_ns=elapsed,
                          logprobs=logprobs)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        """The upstream's stream as ``TextDelta`` pieces; closing this iterator closes the HTTP response at
        once (shielded from the caller's cancellation), which is how the upstream learns to stop."""
        path, param = _endpoint(request)
        chat = request.messages is not None
        started = time.perf_counter_ns()
        try:
            response = await self._client.stream("POST", self._prefix + path,
                                                 orjson.dumps(self._body(request, stream=True)), JSON_HEADERS)
        except (TransportError, TimeoutError) as exc:
            raise self._transport_error(exc, path) from None
        pieces: list[str] = []
        chunks_with_text = 0
        first_token_ns: int | None = None
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        done = False
        try:
            if response.status != 200:
                raise self._status_error(response.status, response.headers, await response.read(), param)
            async for raw in response.lines():
                if not raw.startswith(b"data:"):
                    continue  # blank separators, comments, keep-alive pings
                data = raw[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = self._chunk(data)
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if not choices:
                    continue  # the usage chunk
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                finish_reason = choice.get("finish_reason") or finish_reason
                if text:
                    if first_token_ns is None:
                        first_token_ns = time.perf_counter_ns() - started
                    chunks_with_text += 1
                    pieces.append(text)
                    yield TextDelta(text)
            if not done:
                raise UpstreamError(f"upstream {self.name}: the stream of {path} ended before [DONE]")
            # the body's end is usually a packet behind [DONE]: read to it, so the connection goes back to the pool
            await response.drain(DRAIN_AFTER_LAST_S)
        except (TransportError, TimeoutError) as exc:
            raise self._transport_error(exc, path) from None
        finally:
            with anyio.CancelScope(shield=True):
                # read to its end: back to the pool; else closed, which is how the upstream learns to stop
                await response.aclose()
        elapsed = time.perf_counter_ns() - started
        prompt_eval_ns = first_token_ns if first_token_ns is not None else elapsed
        yield Generation(text="".join(pieces), finish_reason=_finish(finish_reason),
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or chunks_with_text),
                         prompt_eval_ns=prompt_eval_ns, eval_ns=elapsed - prompt_eval_ns)

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": request.model.upstream_model or request.model.name}
        if request.messages is not None:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt
            if request.logprobs is not None:
                body["logprobs"] = request.logprobs
            if request.echo:
                body["echo"] = True
        body.update(_sampling_fields(request.sampling))
        if request.output_format is not None:
            body.update(self._format_fields(request.output_format, chat=request.messages is not None))
        if stream:
            body["stream"] = True
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        return body

    def _format_fields(self, output_format: OutputFormat, *, chat: bool) -> dict[str, Any]:
        schema = output_format.schema if output_format.kind == "json_schema" else None
        if self.schema_in_json_object:
            if not chat:
                return {"grammar": _llama_grammar(output_format)}
            return {"response_format": {"type": "json_object", **({"schema": schema} if schema else {})}}
        if schema is None:
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "output", "schema": schema, "strict": True}}}

    # --- embeddings, housekeeping ----------------------------------------------------------------

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        """One vector per input, in input order. OpenAI's API has no ``truncate``: an input too long for the
        model meets the upstream's own rule (OpenAI refuses it, which comes back as ``InvalidRequest``)."""
        answer = await self._post_json("/embeddings", {"model": model.upstream_model or model.name,
                                                       "input": inputs}, "input")
        items = answer.get("data")
        if not isinstance(items, list) or len(items) != len(inputs):
            raise UpstreamError(f"upstream {self.name}: /embeddings answered {len(items or [])} vectors "
                                f"for {len(inputs)} inputs")
        ordered = sorted(items, key=lambda item: item.get("index", 0))
        usage = answer.get("usage") or {}
        return Embeddings(vectors=[_pooled(item["embedding"]) for item in ordered],
                          prompt_tokens=int(usage.get("prompt_tokens") or 0))

    async def loaded(self) -> list[LoadedModel]:
        return []

    async def unload(self, model: ServedModel) -> None:
        """Nothing to let go: the upstream holds its models."""

    async def close(self) -> None:
        await self._client.close()

    async def health(self) -> bool:
        """Whether the upstream answers its model list within ``HEALTH_TIMEOUT_S``."""
        try:
            response = await self._client.request("GET", f"{self._prefix}/models", timeout_s=HEALTH_TIMEOUT_S)
        except (TransportError, TimeoutError):
            return False
        return response.status == 200

    # --- the wire --------------------------------------------------------------------------------

    async def post_json_to(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON POST to the same server outside its OpenAI API (llama_cpp.server's ``/extras/tokenize``), on
        the pooled client (so ``url`` must be on ``base_url``'s origin); any failure is an ``UpstreamError``."""
        if not url.startswith(self._origin + "/"):
            raise UpstreamError(f"upstream {self.name}: {url} is not on {self._origin}", status=502)
        try:
            response = await self._client.request("POST", url[len(self._origin):], orjson.dumps(body), JSON_HEADERS)
        except (TransportError, TimeoutError) as exc:
            raise self._transport_error(exc, url) from None
        status, content = response.status, response.body
        try:
            answer = orjson.loads(content) if status == 200 else None
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError(f"upstream {self.name}: {url} answered {status} without a JSON object", status=502)
        return answer

    async def _post_json(self, path: str, body: dict[str, Any], param: str) -> dict[str, Any]:
        try:
            response = await self._client.request("POST", self._prefix + path, orjson.dumps(body), JSON_HEADERS)
        except (TransportError, TimeoutError) as exc:
            raise self._transport_error(exc, path) from None
        status, content = response.status, response.body
        if status != 200:
            raise self._status_error(status, response.headers, content, param)
        try:
            answer = orjson.loads(content)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError(f"upstream {self.name}: {path} answered 200 with a body that is not a JSON object")
        return answer

    def _chunk(self, data: bytes) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            shown = redact(data[:200].decode(errors="replace"))
            raise UpstreamError(f"upstream {self.name}: a stream event is not a JSON object: {shown}")
        if chunk.get("error"):  # an error reported mid-stream (OpenAI, vLLM)
            raise UpstreamError(f"upstream {self.name}: error mid-stream: {_error_fields(data)[0]}")
        return chunk

    def _transport_error(self, exc: BaseException, path: str) -> UpstreamError:
        if isinstance(exc, TimeoutError):
            return UpstreamError(f"upstream {self.name}: {path} timed out ({type(exc).__name__})", status=504)
        kind = "ConnectError" if isinstance(exc, ConnectFailed) else type(exc).__name__
        return UpstreamError(f"upstream {self.name}: {path} failed: {kind}: {redact(str(exc))}")

    def _status_error(self, status: int, headers: Mapping[str, str], content: bytes, param: str) -> Exception:
        message, upstream_param, code = _error_fields(content)
        if 400 <= status < 500 and status not in NOT_THE_CALLERS:
            if code == "context_length_exceeded" or _CONTEXT_LENGTH.search(message):
                return InvalidRequest(message, param=param, code="context_length_exceeded")
            return InvalidRequest(message, param=upstream_param or param)
        retry_after = retry_after_seconds(headers.get("retry-after")) if status == 429 else None
        return UpstreamError(f"upstream {self.name} answered {status}: {message}", status=status,
                             retry_after=retry_after)


def _endpoint(request: GenerationRequest) -> tuple[str, str]:
    """The path a request goes to and the parameter an error about its input names."""
    return ("/chat/completions", "messages") if request.messages is not None else ("/completions", "prompt")


def _sampling_fields(sampling: Sampling) -> dict[str, Any]:
    """What the caller set, by OpenAI's names; a negative ``max_tokens`` (Ollama's "no limit") is left out."""
    fields = sampling.set_fields()
    if fields.get("max_tokens", 0) < 0:
        del fields["max_tokens"]
    return {name: value for name, value in fields.items() if name in OPENAI_SAMPLING or name in EXTRA_SAMPLING}


def _llama_grammar(output_format: OutputFormat) -> str:
    """The GBNF llama_cpp.server's ``/completions`` constrains output with (it takes no ``response_format``)."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if output_format.kind != "json_schema" or not output_format.schema:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(orjson.dumps(output_format.schema).decode())
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"the JSON schema cannot be used to constrain the output: {exc}",
                             param=output_format.param) from None


def _first_choice(answer: dict[str, Any], upstream: str) -> dict[str, Any]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError(f"upstream {upstream}: an answer without choices")
    return choices[0]


def _finish(reason: str | None) -> Any:
    return "length" if reason == "length" else "stop"


def _pooled(vector: list[Any]) -> list[float]:
    """A flat vector as is; per-token states (llama_cpp.server on a model without pooling) mean-pooled and
    normalized, as the in-process backend answers."""
    if not vector or not isinstance(vector[0], list):
        return vector
    mean = [sum(column) / len(vector) for column in zip(*vector, strict=True)]
    norm = math.sqrt(sum(value * value for value in mean)) or 1.0
    return [value / norm for value in mean]


def _error_fields(content: bytes) -> tuple[str, str | None, str | None]:
    """The message (scrubbed), param and code of an error body in any of the shapes upstreams use: OpenAI's
    ``{"error": {...}}``, ``{"error": "..."}``, vLLM's top-level ``message``, FastAPI's ``detail``."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = None
    message: Any = None
    param: Any = None
    code: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message, param, code = error.get("message"), error.get("param"), error.get("code")
        else:
            message = error or body.get("message") or body.get("detail")
    if not message:
        message = content.decode(errors="replace")
    text = redact(str(message))[:ERROR_TEXT_LIMIT] or "(no message)"
    return text, param if isinstance(param, str) else None, code if isinstance(code, str) else None


