"""The chat service's translation between OpenAI requests and a backend, with a scripted backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from afina.core.errors import InferenceUnavailable, InvalidRequest
from afina.gateway.chat import service
from afina.gateway.chat.protocol import ChatCompletionRequest
from afina.gateway.inference.base import ChatRequest, InferenceBackend, usage_chunk

MODEL = service.ServedModel("ft:base:acme::ftjob-1", Path("/models/x.gguf"))


def chat_request(**changes: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": MODEL.name, "messages": [{"role": "user", "content": "hi"}], **changes})


class ScriptedBackend:
    """Answers with fixed chunks (a test double for the backend contract, not for llama.cpp)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.requests: list[ChatRequest] = []
        self.fail_after = fail_after

    async def chat(self, request: ChatRequest) -> dict[str, Any]:
        self.requests.append(request)
        return {"id": "backend-id", "model": "/models/x.gguf",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(request)
        deltas = [{"role": "assistant"}, {"content": "Hel"}, {"content": "lo"}, {}]
        for index, delta in enumerate(deltas):
            if self.fail_after is not None and index >= self.fail_after:
                raise InferenceUnavailable("backend went away")
            yield {"id": "backend-id", "model": "/models/x.gguf",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if index == 3 else None}]}
        yield usage_chunk(5, 2)

    async def close(self) -> None:
        pass


def test_scripted_backend_honours_the_protocol() -> None:
    assert isinstance(ScriptedBackend(), InferenceBackend)


def test_backend_request_options() -> None:
    built = service.build_backend_request(chat_request(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        temperature=0, max_tokens=9, max_completion_tokens=5, stop="\n", seed=3, user="u1"), MODEL)
    assert built.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert built.options == {"temperature": 0, "max_tokens": 5, "stop": "\n", "seed": 3}
    assert built.model_path == MODEL.path and not built.include_usage


@pytest.mark.parametrize("changes, param", [({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"),
                                            ({"messages": [{"role": "user", "content": [
                                                {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages")])
def test_unsupported_requests(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        service.build_backend_request(chat_request(**changes), MODEL)
    assert caught.value.param == param


def test_complete_uses_the_public_name_and_a_fresh_id() -> None:
    completion = anyio.run(service.complete, ScriptedBackend(), MODEL, chat_request())
    assert completion.model == MODEL.name and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "Hello"
    assert completion.usage.total_tokens == 6


async def _collect(backend: ScriptedBackend, request: ChatCompletionRequest) -> list[bytes]:
    return [event async for event in service.sse(None, service.stream(backend, MODEL, request))]


def _events(raw: list[bytes]) -> list[Any]:
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in raw)
    return [event[6:-2].decode() if event == b"data: [DONE]\n\n" else orjson.loads(event[6:-2]) for event in raw]


def test_stream_with_usage_ends_with_a_usage_chunk_then_done() -> None:
    events = _events(anyio.run(_collect, ScriptedBackend(), chat_request(stream=True,
                                                                         stream_options={"include_usage": True})))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["model"] == MODEL.name and chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


def test_stream_without_usage_has_no_usage_chunk() -> None:
    events = _events(anyio.run(_collect, ScriptedBackend(), chat_request(stream=True)))
    assert all(chunk["choices"] and "usage" not in chunk for chunk in events[:-1])
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in events[:-1]) == "Hello"


def test_failure_mid_stream_becomes_an_error_event() -> None:
    events = _events(anyio.run(_collect, ScriptedBackend(fail_after=2), chat_request(stream=True)))
    assert events[-2] == {"error": {"message": "backend went away", "type": "server_error", "param": None,
                                    "code": "model_unavailable"}}
    assert events[-1] == "[DONE]"
