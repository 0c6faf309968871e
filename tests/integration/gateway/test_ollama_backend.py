"""The gateway's Ollama backend (``afina.gateway.inference.ollama``) against the contract Ollama
(``tests.support.ollama_server``): SmolLM2 registered once with the official ``ollama`` client, then
``OllamaBackend`` driven directly. Chats and raw prompts, whole and streamed; the options Ollama must
honour; structured output; embeddings; what is loaded; and the failures, both those a fallback covers
(``UpstreamError``) and the caller's own (``InvalidRequest``). Answers are kept to a few tokens."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import ollama
import pytest

from afina.core.catalog import CHATML, resolve_base_model
from afina.core.errors import InvalidRequest
from afina.gateway.inference.base import (
    OLLAMA_BACKEND,
    Generation,
    GenerationRequest,
    LoadedModel,
    OutputFormat,
    Sampling,
    ServedModel,
    TextDelta,
    UpstreamError,
)
from afina.gateway.inference.ollama import OllamaBackend
from tests.integration.gateway.conftest import SMOLLM2
from tests.support.gotemplate import ollama_prompt
from tests.support.ollama_server import ContractOllama
from tests.support.servers import serve_app

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

NAME = "acme-smol"  # its name inside Ollama
NUM_CTX = 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = Sampling(temperature=0, max_tokens=10)
MODEL = ServedModel(name=f"ft:{NAME}", backend=OLLAMA_BACKEND, upstream_model=NAME)


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContractOllama]:
    """One contract Ollama for the module, with SmolLM2 registered as the exporter registers a model."""
    server = ContractOllama(tmp_path_factory.mktemp("contract-ollama")).start()
    try:
        client = ollama.Client(host=server.url)
        digest = client.create_blob(resolve_base_model(SMOLLM2).gguf_path())
        client.create(model=NAME, files={"model.gguf": digest}, template=CHATML.ollama_template,
                      parameters={"stop": list(CHATML.stop), "num_ctx": NUM_CTX})
        yield server
    finally:
        server.stop()


@pytest.fixture
async def backend(contract: ContractOllama) -> AsyncIterator[OllamaBackend]:
    backend = OllamaBackend(contract.url, timeout_s=120)
    yield backend
    await backend.close()


def chat(sampling: Sampling = GREEDY, **fields: object) -> GenerationRequest:
    return GenerationRequest(model=MODEL, messages=QUESTION, sampling=sampling, **fields)  # type: ignore[arg-type]


def raw(prompt: str, sampling: Sampling = GREEDY, **fields: object) -> GenerationRequest:
    return GenerationRequest(model=MODEL, prompt=prompt, sampling=sampling, **fields)  # type: ignore[arg-type]


async def streamed(backend: OllamaBackend, request: GenerationRequest) -> tuple[list[str], Generation]:
    items = [item async for item in backend.stream(request)]
    assert all(isinstance(item, TextDelta) for item in items[:-1]) and isinstance(items[-1], Generation)
    return [item.text for item in items[:-1]], items[-1]  # type: ignore[union-attr]


def assert_metered(answer: Generation) -> None:
    assert answer.prompt_tokens > 0 and answer.completion_tokens > 0
    assert answer.load_ns > 0 and answer.prompt_eval_ns > 0 and answer.eval_ns > 0


# --- generation -------------------------------------------------------------------------------------------------

async def test_a_chat_streamed_says_what_it_says_whole(backend: OllamaBackend) -> None:
    whole = await backend.generate(chat())
    pieces, final = await streamed(backend, chat())
    assert whole.text.strip() and len(pieces) > 1 and "".join(pieces) == final.text == whole.text
    assert (final.prompt_tokens, final.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)
    assert_metered(whole)
    assert_metered(final)


async def test_a_raw_prompt_reaches_the_model_untemplated(backend: OllamaBackend) -> None:
    # the prompt Ollama renders for the chat, sent raw: templated again, it would not say the same
    prompt = ollama_prompt(CHATML.ollama_template, QUESTION)
    answer = await backend.generate(raw(prompt))
    assert answer.text == (await backend.generate(chat())).text
    pieces, final = await streamed(backend, raw(prompt))
    assert "".join(pieces) == final.text == answer.text
    assert_metered(final)


async def test_max_tokens_a_stop_string_and_a_seed_are_honoured(backend: OllamaBackend) -> None:
    cut = await backend.generate(chat(Sampling(temperature=0, max_tokens=3)))
    assert cut.finish_reason == "length" and 0 < cut.completion_tokens <= 3

    full = await backend.generate(chat())
    stop = full.text.split()[2]  # a word in the middle of the greedy answer
    stopped = await backend.generate(chat(Sampling(temperature=0, max_tokens=10, stop=(stop,))))
    assert stopped.text == full.text[:full.text.index(stop)] and stopped.finish_reason == "stop"

    def seeded(seed: int) -> GenerationRequest:
        return chat(Sampling(temperature=1.5, max_tokens=10, seed=seed))

    first, again, other = [(await backend.generate(seeded(seed))).text for seed in (7, 7, 8)]
    assert first == again and first != other


async def test_json_output_parses_and_a_schema_is_followed(backend: OllamaBackend) -> None:
    # (questions whose constrained answers are compact: llama.cpp's JSON grammar is slow on indented output)
    asked = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    answer = await backend.generate(GenerationRequest(model=MODEL, messages=asked, output_format=OutputFormat("json"),
                                                      sampling=Sampling(temperature=0, max_tokens=24)))
    assert isinstance(json.loads(answer.text), dict)

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    prompt = ollama_prompt(CHATML.ollama_template, [{"role": "user", "content": "Which city is France's capital?"}])
    _, final = await streamed(backend, raw(prompt, Sampling(temperature=0, max_tokens=24),
                                           output_format=OutputFormat("json_schema", schema=schema)))
    assert isinstance(json.loads(final.text)["city"], str)


async def test_closing_a_stream_early_stops_the_generation(backend: OllamaBackend, contract: ContractOllama) -> None:
    counting = raw("1, 2, 3, 4, 5, 6, 7, 8,", Sampling(temperature=0, max_tokens=400))
    before = len(contract.state.generations)
    stream = backend.stream(counting)
    assert isinstance(await anext(stream), TextDelta)
    await stream.aclose()  # type: ignore[attr-defined]
    (tally,) = contract.state.generations[before:]
    with anyio.fail_after(30):
        while not tally.stopped:
            await anyio.sleep(0.05)
    assert not tally.completed and tally.tokens < 40  # of 400 it was asked for


# --- embeddings, what is loaded -----------------------------------------------------------------------------------

async def test_embed_answers_one_unit_vector_per_input(backend: OllamaBackend) -> None:
    embeddings = await backend.embed(MODEL, ["hello world", "bonjour le monde", "x"])
    assert len(embeddings.vectors) == 3 and len({len(vector) for vector in embeddings.vectors}) == 1
    assert all(math.isclose(math.fsum(value * value for value in vector), 1.0, rel_tol=1e-4)
               for vector in embeddings.vectors)
    assert embeddings.vectors[0] != embeddings.vectors[1] and embeddings.prompt_tokens > 0

    with pytest.raises(InvalidRequest, match="the input length exceeds the context length") as refused:
        await backend.embed(MODEL, ["word " * (NUM_CTX + 10)], truncate=False)
    assert refused.value.code == "context_length_exceeded"


async def test_loaded_models_their_expiry_and_unload(backend: OllamaBackend) -> None:
    def ours(loaded: list[LoadedModel]) -> list[LoadedModel]:
        return [entry for entry in loaded if entry.model.upstream_model == f"{NAME}:latest"]

    await backend.generate(chat(Sampling(temperature=0, max_tokens=1), keep_alive_s=60))
    (entry,) = ours(await backend.loaded())
    assert entry.model.backend == OLLAMA_BACKEND and entry.size > 0
    assert entry.expires_at is not None and 50 < entry.expires_at - time.time() <= 60

    await backend.unload(MODEL)
    assert ours(await backend.loaded()) == []
    await backend.unload(ServedModel(name="gone", backend=OLLAMA_BACKEND, upstream_model="acme-gone"))  # no error

    await backend.generate(chat(Sampling(temperature=0, max_tokens=1), keep_alive_s=-1))
    assert [entry.expires_at for entry in ours(await backend.loaded())] == [None]  # until evicted
    await backend.generate(chat(Sampling(temperature=0, max_tokens=1), keep_alive_s=0))
    assert ours(await backend.loaded()) == []


# --- failures ---------------------------------------------------------------------------------------------------

async def test_a_model_ollama_does_not_have_is_an_upstream_error(backend: OllamaBackend) -> None:
    missing = ServedModel(name="ft:acme-missing", backend=OLLAMA_BACKEND, upstream_model="acme-missing")
    with pytest.raises(UpstreamError, match="model 'acme-missing' not found") as failed:
        await backend.generate(GenerationRequest(model=missing, messages=QUESTION, sampling=GREEDY))
    assert failed.value.status == 502
    with pytest.raises(UpstreamError):
        await streamed(backend, GenerationRequest(model=missing, prompt="hi", sampling=GREEDY))
    with pytest.raises(UpstreamError, match="not found, try pulling it first"):
        await backend.embed(missing, ["hi"])


async def test_a_wrongly_typed_option_is_the_callers_mistake(backend: OllamaBackend) -> None:
    with pytest.raises(InvalidRequest, match='^option "top_k" must be of type integer$'):
        await backend.generate(chat(Sampling(top_k="many")))  # type: ignore[arg-type]


async def test_ollama_down_is_an_upstream_error(backend: OllamaBackend, contract: ContractOllama) -> None:
    assert await backend.health()
    contract.go_down()
    try:
        assert not await backend.health()
        with pytest.raises(UpstreamError, match="not reachable") as failed:
            await backend.generate(chat())
        assert failed.value.status == 502
        with pytest.raises(UpstreamError, match="not reachable"):
            await backend.loaded()
    finally:
        contract.come_back()
    assert await backend.health()


async def test_a_busy_failing_or_slow_ollama_is_an_upstream_error() -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def busy(request: object) -> JSONResponse:
        return JSONResponse({"error": "server busy, please try again"}, status_code=429, headers={"Retry-After": "7"})

    async def failing(request: object) -> JSONResponse:
        return JSONResponse({"error": "llama runner process has terminated"}, status_code=500)

    async def slow(request: object) -> JSONResponse:
        await anyio.sleep(1)
        return JSONResponse({"model": NAME, "embeddings": []})

    served = serve_app(Starlette(routes=[Route("/api/chat", busy, methods=["POST"]),
                                         Route("/api/generate", failing, methods=["POST"]),
                                         Route("/api/embed", slow, methods=["POST"])]))
    backend = OllamaBackend(served.url, timeout_s=0.2)
    try:
        with pytest.raises(UpstreamError, match="server busy") as busy_error:
            await backend.generate(chat())
        assert (busy_error.value.status, busy_error.value.retry_after) == (429, 7.0)
        with pytest.raises(UpstreamError, match="runner process has terminated") as failed:
            await streamed(backend, raw("hi"))
        assert (failed.value.status, failed.value.retry_after) == (502, None)
        with pytest.raises(UpstreamError, match="in time") as too_slow:
            await backend.embed(MODEL, ["hi"])
        assert too_slow.value.status == 504
    finally:
        await backend.close()
        served.stop()
