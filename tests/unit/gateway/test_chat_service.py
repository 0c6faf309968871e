"""The chat service's translation between OpenAI requests and a backend, through the real ``Dispatcher`` and
``ModelLimiter`` with a scripted backend and small stand-ins for ``Resolver`` and ``Backends`` (the real ones
need a database and settings)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from afina.core.errors import AfinaError, InferenceUnavailable, InvalidRequest
from afina.core.keys import KeyGrant
from afina.core.routing import RouteOptions, RouteTarget
from afina.gateway.chat import service
from afina.gateway.chat.protocol import ChatCompletionRequest
from afina.gateway.inference.base import (
    LOCAL_BACKEND,
    Embeddings,
    Generation,
    GenerationRequest,
    InferenceBackend,
    LoadedModel,
    OutputFormat,
    Sampling,
    ServedModel,
    TextDelta,
    UpstreamError,
)
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.limiter import ModelLimiter
from afina.gateway.serving.resolve import Plan, model_not_found

TENANT = "tenant-1"
CALLER = KeyGrant(tenant_id=TENANT, prefix="afk-test00")
NAME = "ft:llama3.2-1b:acme::ftjob-1"
SERVED = ServedModel(NAME, path=Path("/models/x.gguf"))
T = TypeVar("T")


def run(scenario: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, timeout=10))


@dataclass
class ScriptedBackend:
    """Answers "Hello" in fixed pieces (a test double for the backend contract, not for llama.cpp); records
    every request it gets. ``error`` is raised after ``fail_after`` pieces of a stream."""

    pieces: tuple[str, ...] = ("Hel", "lo")
    error: BaseException | None = None
    fail_after: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return Generation(text="".join(self.pieces), prompt_tokens=5, completion_tokens=len(self.pieces))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        self.requests.append(request)
        for index, text in enumerate(self.pieces):
            if self.error is not None and index == self.fail_after:
                raise self.error
            yield TextDelta(text)
        yield Generation(text="".join(self.pieces), finish_reason="stop", prompt_tokens=5,
                         completion_tokens=len(self.pieces))

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        return Embeddings(vectors=[[0.0] for _ in inputs])

    async def loaded(self) -> list[LoadedModel]:
        return []

    async def unload(self, model: ServedModel) -> None:
        pass

    async def close(self) -> None:
        pass


class OneModel:
    """``Resolver``'s two methods for a tenant that has one model, ``NAME``."""

    async def plan(self, tenant_id: str, name: str, user: str | None = None) -> Plan:
        if name != NAME:
            raise model_not_found(name)
        return Plan(requested=name, candidates=[RouteTarget(model=name)])

    async def served(self, tenant_id: str, target: RouteTarget) -> ServedModel:
        if target.model != NAME:
            raise model_not_found(target.model)
        return SERVED


@dataclass
class LocalOnly:
    """``Backends``' get/concurrency/all with the scripted backend as the local one."""

    backend: InferenceBackend

    def get(self, name: str) -> InferenceBackend:
        if name != LOCAL_BACKEND:
            raise InferenceUnavailable(f"the upstream {name!r} is not configured on this gateway")
        return self.backend

    def concurrency(self, name: str) -> int:
        return 1

    def all(self) -> list[InferenceBackend]:
        return [self.backend]


def dispatcher(backend: ScriptedBackend) -> Dispatcher:
    return Dispatcher(OneModel(), LocalOnly(backend), ModelLimiter(max_queue=4, queue_timeout_s=5))  # type: ignore[arg-type]


def plan(**changes: Any) -> Plan:
    return Plan(**{"requested": NAME, "candidates": [RouteTarget(model=NAME)], **changes})


def chat_request(**changes: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": NAME, "messages": [{"role": "user", "content": "hi"}], **changes})


def test_scripted_backend_honours_the_protocol() -> None:
    assert isinstance(ScriptedBackend(), InferenceBackend)


def test_the_dispatcher_plans_a_model_by_name() -> None:
    assert run(dispatcher(ScriptedBackend()).plan(TENANT, NAME)) == plan()


# --- the request a backend gets ------------------------------------------------------------------------------


def test_generation_request() -> None:
    built = service.generation_request(chat_request(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None}],
        temperature=0, max_tokens=9, max_completion_tokens=5, stop="\n", seed=3, user="u1"), plan(), SERVED)
    assert built.model == SERVED and built.prompt is None and built.output_format is None
    assert built.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                              {"role": "assistant", "content": ""}]
    assert built.sampling == Sampling(temperature=0, max_tokens=5, stop=("\n",), seed=3)
    assert built.sampling.set_fields() == {"temperature": 0, "max_tokens": 5, "stop": ["\n"], "seed": 3}


def test_max_tokens_counts_when_max_completion_tokens_is_unset() -> None:
    built = service.generation_request(chat_request(max_tokens=9, stop=["a", "b"]), plan(), SERVED)
    assert (built.sampling.max_tokens, built.sampling.stop) == (9, ("a", "b"))


@pytest.mark.parametrize("changes, param", [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}]},
     "messages"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_unsupported_requests(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        service.generation_request(chat_request(**changes), plan(), SERVED)
    assert caught.value.param == param


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, OutputFormat("json")),
    ({"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}},
     OutputFormat("json_schema", SCHEMA)),
])
def test_response_format_becomes_an_output_format(response_format: dict[str, Any],
                                                  expected: OutputFormat | None) -> None:
    built = service.generation_request(chat_request(response_format=response_format), plan(), SERVED)
    assert built.output_format == expected
    assert expected is None or built.output_format.param == "response_format"  # type: ignore[union-attr]


def test_a_route_adds_its_system_prompt_and_defaults_under_the_requests_own_values() -> None:
    route = plan(route="support", system="answer in Portuguese",
                 defaults=RouteOptions(temperature=0.2, max_tokens=64, stop=["END"]))
    built = service.generation_request(chat_request(temperature=0.9), route, SERVED)
    assert built.messages == [{"role": "system", "content": "answer in Portuguese"},
                              {"role": "user", "content": "hi"}]
    assert built.sampling == Sampling(temperature=0.9, max_tokens=64, stop=("END",))
    own = service.generation_request(chat_request(messages=[{"role": "developer", "content": "be terse"},
                                                            {"role": "user", "content": "hi"}]), route, SERVED)
    assert own.messages[0] == {"role": "system", "content": "be terse"} and len(own.messages) == 2


# --- a whole completion --------------------------------------------------------------------------------------


def test_complete_uses_the_public_name_and_a_fresh_id() -> None:
    backend = ScriptedBackend()
    completion, answered = run(service.complete(dispatcher(backend), CALLER, plan(), chat_request()))
    again, _ = run(service.complete(dispatcher(backend), CALLER, plan(), chat_request()))
    assert completion.model == NAME and completion.id.startswith("chatcmpl-") and again.id != completion.id
    assert completion.choices[0].message.content == "Hello" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.model_dump() == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert answered.served == SERVED and backend.requests[0].model == SERVED
    assert "/models/x.gguf" not in completion.model_dump_json()  # the served path never reaches the caller


@pytest.mark.parametrize("seed, seeds", [(7, [7, 8]), (None, [None, None])])
def test_n_choices_move_a_set_seed_by_one(seed: int | None, seeds: list[int | None]) -> None:
    backend = ScriptedBackend()
    completion, _ = run(service.complete(dispatcher(backend), CALLER, plan(), chat_request(n=2, seed=seed)))
    assert [request.sampling.seed for request in backend.requests] == seeds
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.usage.model_dump() == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_a_failing_model_is_an_error_not_a_completion() -> None:
    with pytest.raises(InferenceUnavailable):
        run(service.complete(dispatcher(ScriptedBackend(error=InferenceUnavailable("down"))), CALLER, plan(),
                             chat_request()))


# --- streams -------------------------------------------------------------------------------------------------


async def collect(backend: ScriptedBackend, request: ChatCompletionRequest) -> list[bytes]:
    _answered, chunks = await service.stream(dispatcher(backend), CALLER, plan(), request)
    return [event async for event in service.sse(chunks)]


def events(raw: list[bytes]) -> list[Any]:
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in raw)
    return [event[6:-2].decode() if event == b"data: [DONE]\n\n" else orjson.loads(event[6:-2]) for event in raw]


def text_of(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(choice["delta"].get("content", "") for chunk in chunks for choice in chunk["choices"]
                   if choice["index"] == index)


def test_stream_with_usage_ends_with_a_usage_chunk_then_done() -> None:
    received = events(run(collect(ScriptedBackend(), chat_request(stream=True,
                                                                  stream_options={"include_usage": True}))))
    assert received[-1] == "[DONE]"
    chunks = received[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["model"] == NAME and chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                                                   "total_tokens": 7}
    assert text_of(chunks) == "Hello"


def test_stream_without_usage_has_no_usage_chunk() -> None:
    received = events(run(collect(ScriptedBackend(), chat_request(stream=True))))
    chunks = received[:-1]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text_of(chunks) == "Hello"
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, None, "stop"]


def test_a_stream_of_n_choices_moves_the_seed_and_keeps_one_id() -> None:
    backend = ScriptedBackend()
    received = events(run(collect(backend, chat_request(stream=True, n=2, seed=11,
                                                        stream_options={"include_usage": True}))))
    chunks = received[:-1]
    assert [request.sampling.seed for request in backend.requests] == [11, 12]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert text_of(chunks, 0) == text_of(chunks, 1) == "Hello"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("error, body", [
    (InferenceUnavailable("backend went away"),
     {"message": "backend went away", "type": "server_error", "param": None, "code": "model_unavailable"}),
    (UpstreamError("upstream said: internal detail", status=502),
     {"message": "The model stopped answering mid-stream.", "type": "server_error", "param": None,
      "code": "upstream_error"}),
])
def test_failure_mid_stream_becomes_an_error_event(error: Exception, body: dict[str, Any]) -> None:
    received = events(run(collect(ScriptedBackend(error=error, fail_after=1), chat_request(stream=True))))
    assert text_of(received[:-2]) == "Hel"
    assert received[-2] == {"error": body}
    assert received[-1] == "[DONE]"


def test_a_stream_that_cannot_start_is_an_error_before_any_event() -> None:
    """Before the first piece the caller still gets an HTTP error (and a route could still fall back)."""
    with pytest.raises(AfinaError) as caught:
        run(collect(ScriptedBackend(error=InferenceUnavailable("not installed")), chat_request(stream=True)))
    assert caught.value.http_status == 503
