"""Text completions: each prompt continued ``n`` times, answered in OpenAI's ``text_completion`` shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from afina.core.errors import InvalidRequest
from afina.core.keys import KeyGrant
from afina.gateway.chat.protocol import Usage
from afina.gateway.chat.service import nth_choice
from afina.gateway.completions.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from afina.gateway.inference.base import Generation, GenerationRequest, Sampling, ServedModel, TextDelta
from afina.gateway.serving.defaults import with_route_options
from afina.gateway.serving.dispatch import Answered, Dispatcher
from afina.gateway.serving.resolve import Plan


def check_supported(request: CompletionRequest) -> None:
    """What afina does not do yet is refused by name, never ignored into a different answer. Whether a model
    can report token log probabilities is its backend's to say (``refuse_token_level``)."""
    for param, unsupported in (("suffix", request.suffix is not None), ("best_of", (request.best_of or 1) > 1)):
        if unsupported:
            raise InvalidRequest(f"'{param}' is not supported by afina's completions", param=param)
    if request.stream and (request.echo or request.logprobs is not None):
        param = "logprobs" if request.logprobs is not None else "echo"
        raise InvalidRequest(f"'{param}' is answered whole, not streamed: send it without 'stream'", param=param)


def prompts(request: CompletionRequest) -> list[str | list[int]]:
    """Each prompt of the request: a text, or token ids."""
    prompt = request.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)


def generation_request(request: CompletionRequest, plan: Plan, prompt: str | list[int],
                       model: ServedModel) -> GenerationRequest:
    stop = request.stop
    sampling = Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                        min_p=request.min_p, max_tokens=request.max_tokens, seed=request.seed,
                        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
                        repeat_penalty=request.repeat_penalty, presence_penalty=request.presence_penalty,
                        frequency_penalty=request.frequency_penalty)
    return GenerationRequest(model=model, prompt=prompt, sampling=with_route_options(plan, sampling),
                             logprobs=request.logprobs, echo=request.echo)


def _requests(request: CompletionRequest, plan: Plan) -> list[tuple[int, Any]]:
    """(choice index, a builder of its generation request) for every prompt and every ``n``."""
    built = []
    for prompt_index, prompt in enumerate(prompts(request)):
        for choice in range(request.n):
            def build(model: ServedModel, prompt: str | list[int] = prompt, choice: int = choice) -> GenerationRequest:
                return nth_choice(generation_request(request, plan, prompt, model), choice)
            built.append((prompt_index * request.n + choice, build))
    return built


async def complete(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan,
                   request: CompletionRequest) -> tuple[Completion, Answered]:
    check_supported(request)
    choices: list[CompletionChoice] = []
    prompt_tokens = completion_tokens = 0
    answered: Answered | None = None
    for index, build in _requests(request, plan):
        pinned = plan if answered is None else replace(plan, candidates=[answered.target])
        generation, answered = await dispatcher.generate(caller, pinned, build)
        prompt_tokens += generation.prompt_tokens if index % request.n == 0 else 0
        completion_tokens += generation.completion_tokens
        logprobs = generation.logprobs
        choices.append(CompletionChoice(text=generation.text, index=index, finish_reason=generation.finish_reason,
                                        logprobs=None if logprobs is None else CompletionLogprobs(
                                            tokens=logprobs.tokens, token_logprobs=logprobs.token_logprobs,
                                            top_logprobs=logprobs.top_logprobs, text_offset=logprobs.text_offset)))
    assert answered is not None
    return Completion(id=f"cmpl-{answered.exchange_id}", created=int(time.time()), model=plan.requested,
                      choices=choices, usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                   total_tokens=prompt_tokens + completion_tokens)), answered


async def stream(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan,
                 request: CompletionRequest) -> tuple[Answered, AsyncIterator[dict[str, Any]]]:
    check_supported(request)
    builds = _requests(request, plan)
    first = await dispatcher.stream(caller, plan, builds[0][1])
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    pinned = replace(plan, candidates=[first.answered.target])

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        base = {"id": f"cmpl-{first.answered.exchange_id}", "object": "text_completion", "created": int(time.time()),
                "model": plan.requested}
        prompt_tokens = completion_tokens = 0
        for position, (index, build) in enumerate(builds):
            pieces = first.pieces if position == 0 else (await dispatcher.stream(caller, pinned, build)).pieces
            async for piece in pieces:
                if isinstance(piece, TextDelta):
                    yield {**base, "choices": [{"text": piece.text, "index": index, "logprobs": None,
                                                "finish_reason": None}]}
                    continue
                final: Generation = piece
                prompt_tokens += final.prompt_tokens if index % request.n == 0 else 0
                completion_tokens += final.completion_tokens
                yield {**base, "choices": [{"text": "", "index": index, "logprobs": None,
                                            "finish_reason": final.finish_reason}]}
        if include_usage:
            yield {**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                    "completion_tokens": completion_tokens,
                                                    "total_tokens": prompt_tokens + completion_tokens}}

    return first.answered, chunks()
