"""The ``llamacpp-server`` backend: one real ``llama_cpp.server`` per model, proxied, stopped by PID."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from afina.core.catalog import catalog_model
from afina.core.errors import InferenceUnavailable, InvalidRequest
from afina.gateway.inference.base import Generation, GenerationRequest, Sampling, ServedModel, TextDelta
from afina.gateway.inference.llamacpp_server import LlamaServerBackend
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.servers import free_port

# `make install` installs llama-cpp-python[server]; a missing server dependency is a failure here, not a skip
pytestmark = [pytest.mark.integration, pytest.mark.slow]
MESSAGES = [{"role": "user", "content": "Name a colour."}]
T = TypeVar("T")


def _llama_servers() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True)
            if "llama_cpp.server" in " ".join(child.cmdline())]


@pytest.fixture
def server_gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = make_settings(tmp_path / "home", inference_backend="llamacpp-server",
                             llamacpp_server_base_port=free_port(), max_loaded_models=1)
    gateway = start_gateway(settings, tenants=("acme",))
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


def test_chat_through_a_llama_cpp_server(server_gateway: Gateway) -> None:
    client = server_gateway.client("acme")
    assert _llama_servers() == []  # nothing starts before the first request

    completion = client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=8, temperature=0,
                                                seed=5)
    assert completion.model == SMOLLM2 and completion.choices[0].message.content
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    servers = _llama_servers()
    assert len(servers) == 1

    chunks = list(client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 seed=5, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == completion.choices[0].message.content
    assert all(chunk.model == SMOLLM2 for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens > 0
    assert _llama_servers() == servers  # the same server serves every request for the model

    server_gateway.served.stop()  # shutdown stops the server by its PID
    psutil.wait_procs(servers, timeout=15)
    assert not any(server.is_running() and server.status() != psutil.STATUS_ZOMBIE for server in servers)


# --- the backend itself, driven directly -------------------------------------------------------------------

SERVED = ServedModel(name=SMOLLM2, path=catalog_model(SMOLLM2).gguf_path())
GREEDY = GenerationRequest(model=SERVED, messages=MESSAGES, sampling=Sampling(max_tokens=8, temperature=0, seed=5))


def _backend(tmp_path: Path) -> LlamaServerBackend:
    """Two servers at most, of a small context (a prompt too long for it is refused without evaluating it)."""
    return LlamaServerBackend(make_settings(tmp_path / "home", inference_backend="llamacpp-server",
                                            llamacpp_server_base_port=free_port(), max_loaded_models=2,
                                            inference_n_ctx=512))


async def _collect(pieces: AsyncIterator[TextDelta | Generation]) -> tuple[list[str], Generation]:
    deltas = [piece async for piece in pieces]
    last = deltas.pop()
    assert isinstance(last, Generation) and all(isinstance(delta, TextDelta) for delta in deltas)
    return [delta.text for delta in deltas], last  # type: ignore[union-attr]


def _run_then_close(backend: LlamaServerBackend, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run ``scenario``, then close the backend (stopping its servers by PID) whether or not it passed."""

    async def guarded() -> T:
        try:
            return await scenario()
        finally:
            await backend.close()

    return asyncio.run(guarded())


def _all_stopped(servers: list[psutil.Process]) -> bool:
    psutil.wait_procs(servers, timeout=15)
    return not any(server.is_running() and server.status() != psutil.STATUS_ZOMBIE for server in servers)


def test_the_backend_serves_a_model_from_a_server_it_starts_and_replaces_one_that_died(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="afina")
    backend = _backend(tmp_path)
    too_long = replace(GREEDY, messages=[{"role": "user", "content": "word " * 600}])
    counting = GenerationRequest(model=SERVED, prompt="1, 2, 3, 4, 5,", sampling=Sampling(max_tokens=400,
                                                                                          temperature=0))

    async def scenario() -> tuple[list[psutil.Process], str]:
        assert _llama_servers() == []
        whole = await backend.generate(GREEDY)
        servers = _llama_servers()
        assert len(servers) == 1 and whole.text and whole.load_ns > 0

        deltas, last = await _collect(backend.stream(GREEDY))
        assert "".join(deltas) == last.text == whole.text and last.load_ns == 0
        # exact usage in a stream too: the server reports none, a one-token call counts the prompt
        assert (last.prompt_tokens, last.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)
        with pytest.raises(InvalidRequest) as refused:  # refused before the stream starts, not a 200 then nothing
            await anext(backend.stream(too_long))
        assert refused.value.code == "context_length_exceeded"
        assert _llama_servers() == servers  # one server serves every request for the model

        pieces = backend.stream(counting)
        await anext(pieces)
        os.kill(servers[0].pid, signal.SIGKILL)  # the server dies mid-answer
        with pytest.raises(InferenceUnavailable, match=r"^The model failed to answer; error id err_") as failed:
            async for _ in pieces:
                pass
        again = await backend.generate(GREEDY)  # the next call starts a new server
        assert again.text == whole.text and again.load_ns > 0
        replacement = _llama_servers()
        assert len(replacement) == 1 and replacement != servers
        return replacement, failed.value.message

    servers, failed_message = _run_then_close(backend, scenario)
    assert _all_stopped(servers)  # closing stops the server by its PID
    failure = next(record for record in caplog.records if record.getMessage() == "llamacpp_server.upstream_error")
    assert failure.fields["error_id"] in failed_message and failure.fields["upstream_message"]
    died = next(record for record in caplog.records if record.getMessage() == "llamacpp_server.died")
    assert died.fields["returncode"] == -signal.SIGKILL and died.fields["log_tail"]


def test_embeddings_and_other_context_lengths_get_servers_of_their_own(tmp_path: Path) -> None:
    backend = _backend(tmp_path)

    def words(count: int, **fields: object) -> GenerationRequest:
        return replace(GREEDY, messages=[{"role": "user", "content": "word " * count}], **fields)

    async def scenario() -> list[psutil.Process]:
        embeddings = await backend.embed(SERVED, ["a cat", "a dog", "a cat"])
        vectors = embeddings.vectors
        assert len(vectors) == 3 and len(vectors[0]) == 576 and embeddings.load_ns > 0
        assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)  # every input right, not only a batch's first
        assert vectors[1] != pytest.approx(vectors[0], abs=1e-2) and embeddings.prompt_tokens > 0
        with pytest.raises(InvalidRequest) as too_long:
            await backend.embed(SERVED, ["word " * 600], truncate=False)
        assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "input"

        assert (await backend.generate(GREEDY)).text  # a generation server next to the embedding one
        assert len(await backend.loaded()) == 2 and len(_llama_servers()) == 2
        # another context length: a server of its own (the embedding one, least recently used, makes room),
        # stopped after the call by keep_alive 0; its refusal shows its size
        with pytest.raises(InvalidRequest, match="maximum context length is 256 tokens"):
            await backend.generate(words(300, num_ctx=256, keep_alive_s=0))
        loaded = await backend.loaded()
        assert [item.model for item in loaded] == [SERVED] and loaded[0].expires_at is not None
        servers = _llama_servers()
        assert len(servers) == 1
        with pytest.raises(InvalidRequest, match="maximum context length is 512 tokens"):
            await backend.generate(words(600))  # the default context's server, still running
        assert _llama_servers() == servers

        await backend.unload(SERVED)
        assert await backend.loaded() == []
        return servers

    assert _all_stopped(_run_then_close(backend, scenario))
    assert _llama_servers() == []
