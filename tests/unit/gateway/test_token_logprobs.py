"""Token log probabilities in the backend contract: asked only of raw prompts, read from an OpenAI-compatible
answer, and refused with a 400 naming the parameter by the backends that cannot report them (before any call
leaves the gateway)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from afina.core.errors import InvalidRequest
from afina.core.settings import Settings
from afina.gateway.inference.base import GenerationRequest, ServedModel, TokenLogprobs
from afina.gateway.inference.llamacpp_server import LlamaServerBackend
from afina.gateway.inference.ollama import OllamaBackend

MODEL = ServedModel(name="m", backend="ollama", upstream_model="acme-m")


def test_logprobs_and_echo_are_for_raw_prompts() -> None:
    with pytest.raises(ValueError):
        GenerationRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=1)
    assert GenerationRequest(model=MODEL, prompt="hi", echo=True).scored
    assert not GenerationRequest(model=MODEL, prompt="hi").scored


def test_an_openai_logprobs_object_is_read_and_a_missing_one_is_none() -> None:
    read = TokenLogprobs.from_openai({"tokens": ["a", "b"], "token_logprobs": [None, -1.0],
                                      "top_logprobs": [None, {"b": -1.0}], "text_offset": [0, 1]})
    assert read == TokenLogprobs(["a", "b"], [None, -1.0], [None, {"b": -1.0}], [0, 1])
    assert TokenLogprobs.from_openai(None) is None and TokenLogprobs.from_openai({"content": []}) is None
    assert (read + read).tokens == ["a", "b", "a", "b"]


@pytest.mark.parametrize("fields, param", [({"prompt": "hi", "logprobs": 0}, "logprobs"),
                                           ({"prompt": "hi", "echo": True}, "echo"), ({"prompt": [1, 2]}, "prompt")])
def test_ollama_and_llama_servers_refuse_them_before_calling_anything(tmp_path: Path, fields: dict,
                                                                         param: str) -> None:
    request = GenerationRequest(model=MODEL, **fields)
    # nothing listens there, and no llama.cpp server may start: a refusal must come first
    backends = [OllamaBackend("http://127.0.0.1:9", timeout_s=1),
                LlamaServerBackend(Settings(home=tmp_path, llamacpp_server_base_port=9))]

    async def calls() -> None:
        for backend in backends:
            with pytest.raises(InvalidRequest) as caught:
                await backend.generate(request)
            assert caught.value.param == param and caught.value.http_status == 400
            with pytest.raises(InvalidRequest):
                await anext(backend.stream(request))
            await backend.close()

    asyncio.run(calls())
