"""Chat logic: OpenAI's chat request to a generation, and the answer back in OpenAI's wire format.

The backend's own ids and model paths never reach the caller: every completion and chunk carries
the name the caller asked for and one ``chatcmpl-`` id. ``n`` choices are ``n`` generations (a set
``seed`` moves by one per choice, so they differ and stay reproducible).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson

from afina.core.errors import AfinaError, InvalidRequest, UpstreamFailed
from afina.core.keys import KeyGrant
from afina.gateway.chat.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ResponseFormat,
    Usage,
)
from afina.gateway.inference.base import (
    Generation,
    GenerationRequest,
    OutputFormat,
    Sampling,
    ServedModel,
    TextDelta,
    UpstreamError,
)
from afina.gateway.serving.defaults import with_route_options, with_route_system
from afina.gateway.serving.dispatch import Answered, Dispatcher
from afina.gateway.serving.resolve import Plan


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


def output_format(response_format: ResponseFormat | None) -> OutputFormat | None:
    """OpenAI's ``response_format`` as a constraint on the output (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputFormat("json", param="response_format")
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise InvalidRequest("response_format of type json_schema needs json_schema.schema",
                             param="response_format.json_schema")
    return OutputFormat("json_schema", response_format.json_schema.schema_, param="response_format")


def sampling(request: ChatCompletionRequest) -> Sampling:
    stop = request.stop
    return Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
                    max_tokens=request.max_completion_tokens or request.max_tokens,
                    stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), seed=request.seed,
                    repeat_penalty=request.repeat_penalty, presence_penalty=request.presence_penalty,
                    frequency_penalty=request.frequency_penalty)


def generation_request(request: ChatCompletionRequest, plan: Plan, model: ServedModel) -> GenerationRequest:
    if request.tools:
        raise InvalidRequest("tools are not supported by afina's chat completions yet", param="tools")
    messages = with_route_system(plan, [_message_dict(m.role, m.content) for m in request.messages])
    return GenerationRequest(model=model, messages=messages, sampling=with_route_options(plan, sampling(request)),
                             output_format=output_format(request.response_format))


def nth_choice(request: GenerationRequest, index: int) -> GenerationRequest:
    """The request for choice ``index``: a set seed moves by the index, so choices differ reproducibly."""
    if index == 0 or request.sampling.seed is None:
        return request
    return replace(request, sampling=replace(request.sampling, seed=request.sampling.seed + index))


def completion_id(answered: Answered) -> str:
    """The exchange's id, so that feedback and captured data can name the completion a client saw."""
    return f"chatcmpl-{answered.exchange_id}"


async def complete(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan,
                   request: ChatCompletionRequest) -> tuple[ChatCompletion, Answered]:
    generations: list[Generation] = []
    first: Answered | None = None  # the completion's id is the first choice's exchange (what feedback names)
    for index in range(request.n or 1):
        generation, answered = await dispatcher.generate(
            caller, plan if first is None else _pinned(plan, first),
            lambda model, index=index: nth_choice(generation_request(request, plan, model), index))
        first = first or answered
        generations.append(generation)
    assert first is not None
    answered = first
    prompt_tokens = generations[0].prompt_tokens
    completion_tokens = sum(generation.completion_tokens for generation in generations)
    choices = [Choice(index=index, message=AssistantMessage(content=generation.text),
                      finish_reason=generation.finish_reason) for index, generation in enumerate(generations)]
    return ChatCompletion(id=completion_id(answered), created=int(time.time()), model=plan.requested, choices=choices,
                          usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens)), answered


def _pinned(plan: Plan, answered: Answered) -> Plan:
    """The later choices of one request come from the model that answered the first."""
    return replace(plan, candidates=[answered.target])


async def stream(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan,
                 request: ChatCompletionRequest) -> tuple[Answered, AsyncIterator[dict[str, Any]]]:
    """OpenAI chunk dicts; the first choice's stream has started when this returns (so a model that cannot
    answer is an HTTP error, and a fallback can still take over). The usage chunk (empty ``choices``) comes
    last, only when asked for."""
    first = await dispatcher.stream(caller, plan, lambda model: generation_request(request, plan, model))
    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        base = {"id": completion_id(first.answered), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": plan.requested, "system_fingerprint": None}
        extra = {"usage": None} if include_usage else {}
        prompt_tokens = completion_tokens = 0
        for index in range(request.n or 1):
            pieces = first.pieces if index == 0 else (await dispatcher.stream(caller, _pinned(plan, first.answered),
                lambda model, index=index: nth_choice(generation_request(request, plan, model), index))).pieces
            yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}], **extra}
            async for piece in pieces:
                if isinstance(piece, TextDelta):
                    yield {**base, "choices": [{"index": index, "delta": {"content": piece.text},
                                                "finish_reason": None, "logprobs": None}], **extra}
                    continue
                prompt_tokens, completion_tokens = piece.prompt_tokens, completion_tokens + piece.completion_tokens
                yield {**base, "choices": [{"index": index, "delta": {}, "finish_reason": piece.finish_reason,
                                            "logprobs": None}], **extra}
        if include_usage:
            yield {**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                    "completion_tokens": completion_tokens,
                                                    "total_tokens": prompt_tokens + completion_tokens}}

    return first.answered, chunks()


def mid_stream_error(exc: AfinaError | UpstreamError) -> AfinaError:
    """What a caller reads when the model fails after its answer began (no fallback is possible then);
    an upstream's own words stay in the operator's log."""
    return exc if isinstance(exc, AfinaError) else UpstreamFailed("The model stopped answering mid-stream.")


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events: ``data: <chunk>`` per chunk, an error event if the backend fails mid-stream,
    and ``data: [DONE]`` at the end."""
    try:
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except (AfinaError, UpstreamError) as exc:
        yield b"data: " + orjson.dumps(mid_stream_error(exc).to_openai()) + b"\n\n"
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    yield b"data: [DONE]\n\n"
