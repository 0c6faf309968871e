"""Chat logic: find the model's GGUF, call the backend, and speak OpenAI's wire format back.

The backend's own ids and model paths never reach the caller: every completion and
chunk carries the public model name and one ``chatcmpl-`` id.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from anyio import to_thread

from afina.core.artifacts import ManifestInvalid, ServedArtifacts
from afina.core.catalog import catalog_model
from afina.core.catalog.gguf_metadata import gguf_metadata
from afina.core.catalog.template_refusal import first_refused_message, template_refusal
from afina.core.db import repository as repo
from afina.core.errors import AfinaError, InferenceUnavailable, InvalidRequest, NotFound
from afina.core.metrics import INFERENCE_TOKENS
from afina.core.runtime import Runtime
from afina.gateway.chat.protocol import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from afina.gateway.inference import ChatRequest, InferenceBackend
from afina.gateway.inference.files import ModelFileCache
from afina.gateway.inference.inprocess import gguf_template_renderer


@dataclass(frozen=True)
class ServedModel:
    name: str
    path: Path


def _artifact_key(name: str, artifacts: Any) -> str:
    """The GGUF the exporter chose to serve, read through the registry row's ``ServedArtifacts``."""
    try:
        return ServedArtifacts.of_row(artifacts, name).served_key
    except ManifestInvalid:
        raise InferenceUnavailable(f"model {name} has no servable GGUF registered") from None


def _resolve_sync(runtime: Runtime, files: ModelFileCache, tenant_id: str, name: str) -> ServedModel:
    spec = catalog_model(name)  # a catalog base model; paths and store URIs name training sources, not servables
    if spec is not None:
        try:
            return ServedModel(spec.id, spec.gguf_path())
        except NotFound as exc:
            raise InferenceUnavailable(f"base model {spec.id} is not installed here: {exc.message}") from None
    with runtime.db.session() as session:
        row = repo.get_model(session, tenant_id, name)
    if row is None:
        raise NotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    return ServedModel(row.name, files.fetch(_artifact_key(row.name, row.artifacts)))


async def resolve_model(runtime: Runtime, files: ModelFileCache, tenant_id: str, name: str) -> ServedModel:
    """A catalog base model (served from its packaged GGUF) or one of the tenant's registered fine-tunes."""
    return await to_thread.run_sync(_resolve_sync, runtime, files, tenant_id, name)


def _message_dict(role: str, content: Any) -> dict[str, Any]:
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"content parts of type {part.type!r} are not supported; send text",
                                     param="messages")
            texts.append(part.text)
        content = "".join(texts)
    # chat templates know system/user/assistant; OpenAI's newer 'developer' role is a system prompt
    return {"role": "system" if role == "developer" else role, "content": content or ""}


def build_backend_request(request: ChatCompletionRequest, model: ServedModel) -> ChatRequest:
    if request.n not in (None, 1):
        raise InvalidRequest("Invalid 'n': afina generates one choice per request (n=1).", param="n")
    if request.tools:
        raise InvalidRequest("tools are not supported by afina's chat completions yet", param="tools")
    options: dict[str, Any] = request.model_dump(include={"temperature", "top_p", "stop", "seed",
                                                          "presence_penalty", "frequency_penalty"},
                                                 exclude_none=True)
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ChatRequest(model_path=model.path, messages=[_message_dict(m.role, m.content) for m in request.messages],
                       options=options, include_usage=include_usage)


def _meter(usage: dict[str, int]) -> None:
    INFERENCE_TOKENS.labels(kind="prompt").inc(usage.get("prompt_tokens", 0))
    INFERENCE_TOKENS.labels(kind="completion").inc(usage.get("completion_tokens", 0))


def _template_refusal(model: ServedModel, messages: list[dict[str, Any]]) -> InvalidRequest | None:
    """Whether the served GGUF's own chat template refuses ``messages`` (a system message to Gemma 2): asked
    only after a backend failed without saying why (a llama.cpp server answers a template's refusal with a
    500), so that the caller's mistake is a 400 naming the message, not a 503."""
    try:
        template = gguf_metadata(model.path).get("tokenizer.chat_template")
    except InvalidRequest:
        return None
    render = gguf_template_renderer(template) if isinstance(template, str) else None
    if render is None:
        return None
    try:
        render(messages)
    except Exception as refused:  # noqa: BLE001 - the template's own reason, whatever it raised
        return template_refusal(str(refused) or type(refused).__name__, first_refused_message(render, messages))
    return None


async def _refused_by_template(model: ServedModel, backend_request: ChatRequest) -> InvalidRequest | None:
    return await to_thread.run_sync(_template_refusal, model, backend_request.messages)


async def complete(backend: InferenceBackend, model: ServedModel, request: ChatCompletionRequest) -> ChatCompletion:
    backend_request = build_backend_request(request, model)
    try:
        result = await backend.chat(backend_request)
    except InferenceUnavailable:
        refusal = await _refused_by_template(model, backend_request)
        if refusal is not None:
            raise refusal from None
        raise
    usage = result.get("usage") or {}
    _meter(usage)
    choices = [Choice(index=choice.get("index", 0),
                      message=AssistantMessage(content=(choice.get("message") or {}).get("content")),
                      finish_reason=choice.get("finish_reason")) for choice in result.get("choices", [])]
    return ChatCompletion(id=f"chatcmpl-{secrets.token_hex(12)}", created=int(time.time()), model=model.name,
                          choices=choices, usage=Usage(**{key: int(usage.get(key, 0)) for key in
                                                          ("prompt_tokens", "completion_tokens", "total_tokens")}))


async def stream(backend: InferenceBackend, model: ServedModel,
                 request: ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
    """OpenAI chunk dicts; the usage chunk (empty ``choices``) comes last, only when asked for."""
    backend_request = build_backend_request(request, model)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    chunks = backend.stream_chat(backend_request)
    try:
        first = await anext(chunks, None)
    except InferenceUnavailable:
        refusal = await _refused_by_template(model, backend_request)
        if refusal is not None:
            raise refusal from None
        raise
    if first is None:
        return
    async for chunk in _prepend(first, chunks):
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model.name,
                "system_fingerprint": None}
        if not chunk.get("choices"):
            if "usage" in chunk:
                _meter(chunk["usage"])
                if backend_request.include_usage:
                    yield {**base, "choices": [], "usage": chunk["usage"]}
            continue
        choices = [{"index": choice.get("index", 0), "delta": choice.get("delta") or {},
                    "finish_reason": choice.get("finish_reason"), "logprobs": None}
                   for choice in chunk["choices"]]
        yield {**base, "choices": choices, **({"usage": None} if backend_request.include_usage else {})}


async def _prepend(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for item in rest:
        yield item


async def sse(first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events: ``data: <chunk>`` per chunk, an error event if the backend fails mid-stream,
    and ``data: [DONE]`` at the end."""
    try:
        if first is not None:
            yield b"data: " + orjson.dumps(first) + b"\n\n"
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except AfinaError as exc:
        yield b"data: " + orjson.dumps(exc.to_openai()) + b"\n\n"
    yield b"data: [DONE]\n\n"
