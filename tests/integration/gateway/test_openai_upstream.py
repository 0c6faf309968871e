"""``OpenAIUpstream`` against a real ``llama_cpp.server`` on SmolLM2, and against a tiny OpenAI-shaped server
whose faults a test picks (slow, rate limited, refusing, dripping a stream, private behind a key).

The backend is driven directly, with the gateway's own request types: nothing here goes through the HTTP app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from afina.core.catalog import catalog_model
from afina.core.errors import InvalidRequest
from afina.core.logging import redact
from afina.gateway.inference.base import (
    Generation,
    GenerationRequest,
    OutputFormat,
    Sampling,
    ServedModel,
    TextDelta,
    UpstreamError,
)
from afina.gateway.inference.openai_upstream import OpenAIUpstream
from tests.support.servers import ServedApp, free_port, serve_app, stop_process, wait_until

pytestmark = pytest.mark.integration
T = TypeVar("T")
MODEL = ServedModel(name="smollm2", backend="llamacpp", upstream_model="smollm2-135m")
MESSAGES = [{"role": "user", "content": "Name a colour."}]
GREEDY = Sampling(temperature=0, seed=5, max_tokens=8)
API_KEY = "sk-tiny-0123456789abcdef"
AGE_SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
DRIP_CHUNKS = 200
DRIP_INTERVAL_S = 0.05


def run(coroutine: Awaitable[T]) -> T:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def chat(sampling: Sampling = GREEDY, **fields: Any) -> GenerationRequest:
    return GenerationRequest(model=MODEL, messages=MESSAGES, sampling=sampling, **fields)


async def collect(upstream: OpenAIUpstream, request: GenerationRequest) -> tuple[list[str], Generation]:
    deltas: list[str] = []
    async for piece in upstream.stream(request):
        if isinstance(piece, TextDelta):
            deltas.append(piece.text)
        else:
            return deltas, piece
    raise AssertionError("the stream ended without a Generation")


async def using(upstream: OpenAIUpstream, call: Callable[[OpenAIUpstream], Awaitable[T]]) -> T:
    try:
        return await call(upstream)
    finally:
        await upstream.close()


# --- a real llama_cpp.server -------------------------------------------------------------------------------


@dataclass
class LlamaServers:
    chat_url: str  # a generation server
    embedding_url: str  # one started with --embedding true


def _start_llama_server(log_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(catalog_model("smollm2-135m-instruct")
                                                                          .gguf_path()),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", *extra]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}/v1"


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/models", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServers]:
    logs = tmp_path_factory.mktemp("llama-servers")
    started = [_start_llama_server(logs / "chat.log"), _start_llama_server(logs / "embedding.log", "--embedding",
                                                                           "true")]
    try:
        for process, url in started:  # both load at once; waiting for one after the other costs nothing more
            wait_until(lambda url=url: _answers(url), 60, "llama_cpp.server", process)
        yield LlamaServers(chat_url=started[0][1], embedding_url=started[1][1])
    finally:
        for process, _ in started:
            stop_process(process)


def llama_upstream(url: str, **options: Any) -> OpenAIUpstream:
    return OpenAIUpstream(url, name="llama", schema_in_json_object=True, **options)


def test_chat_answers_whole_and_streamed_with_the_same_text(llama: LlamaServers) -> None:
    async def both(upstream: OpenAIUpstream) -> tuple[Generation, list[str], Generation]:
        whole = await upstream.generate(chat())
        deltas, last = await collect(upstream, chat())
        return whole, deltas, last

    whole, deltas, last = run(using(llama_upstream(llama.chat_url), both))

    assert whole.text and whole.finish_reason == "length"
    assert whole.prompt_tokens > 0 and whole.completion_tokens == 8 and whole.eval_ns > 0
    assert "".join(deltas) == last.text == whole.text
    # llama_cpp.server sends no usage in a stream: one completion token per content chunk, no prompt count
    assert last.completion_tokens == len(deltas) == 8 and last.prompt_tokens == 0
    assert last.finish_reason == "length" and last.prompt_eval_ns > 0 and last.eval_ns > 0


def test_a_raw_prompt_is_continued_with_stop_seed_and_max_tokens(llama: LlamaServers) -> None:
    def raw(**sampling: Any) -> GenerationRequest:
        return GenerationRequest(model=MODEL, prompt="The capital of France is", sampling=Sampling(**sampling))

    async def calls(upstream: OpenAIUpstream) -> list[Generation]:
        return [await upstream.generate(raw(temperature=0, max_tokens=12, stop=(".",))),
                await upstream.generate(raw(temperature=0, max_tokens=2)),
                await upstream.generate(raw(temperature=1.5, top_k=200, seed=11, max_tokens=12)),
                await upstream.generate(raw(temperature=1.5, top_k=200, seed=11, max_tokens=12)),
                (await collect(upstream, raw(temperature=0, max_tokens=12, stop=(".",))))[1]]

    stopped, cut, seeded, seeded_again, streamed = run(using(llama_upstream(llama.chat_url), calls))

    assert "Paris" in stopped.text and "." not in stopped.text and stopped.finish_reason == "stop"
    assert cut.finish_reason == "length" and cut.completion_tokens == 2
    assert seeded.text == seeded_again.text  # the same seed samples the same tokens
    assert streamed.text == stopped.text


def test_json_and_json_schema_constrain_the_output(llama: LlamaServers) -> None:
    person = [{"role": "user", "content": "Describe a person as JSON."}]
    empty = [{"role": "user", "content": "Reply with an empty JSON object."}]  # free JSON: short, so it ends
    sampling = Sampling(temperature=0, max_tokens=48)

    async def calls(upstream: OpenAIUpstream) -> list[str]:
        return [(await upstream.generate(GenerationRequest(model=MODEL, messages=empty, sampling=sampling,
                                                           output_format=OutputFormat("json")))).text,
                (await upstream.generate(GenerationRequest(model=MODEL, messages=person, sampling=sampling,
                                                           output_format=OutputFormat("json_schema",
                                                                                      AGE_SCHEMA)))).text,
                (await upstream.generate(GenerationRequest(model=MODEL, prompt="A person as JSON:", sampling=sampling,
                                                           output_format=OutputFormat("json_schema",
                                                                                      AGE_SCHEMA)))).text]

    any_json, chat_schema, raw_schema = run(using(llama_upstream(llama.chat_url), calls))

    assert isinstance(json.loads(any_json), dict)
    for text in (chat_schema, raw_schema):  # chat: the schema in json_object; raw prompt: a grammar
        assert isinstance(json.loads(text)["age"], int)


def test_openai_s_json_schema_shape_is_refused_by_llama_cpp_server(llama: LlamaServers) -> None:
    """Why ``schema_in_json_object`` exists: llama_cpp.server answers OpenAI's shape with a 500."""
    request = chat(output_format=OutputFormat("json_schema", AGE_SCHEMA))
    with pytest.raises(UpstreamError) as caught:
        run(using(OpenAIUpstream(llama.chat_url), lambda upstream: upstream.generate(request)))
    assert caught.value.status == 500


def test_embeddings_from_an_embedding_server(llama: LlamaServers) -> None:
    async def calls(upstream: OpenAIUpstream) -> tuple[Any, Any]:
        return (await upstream.embed(MODEL, ["The cat sat on the mat."]),
                await upstream.embed(MODEL, ["The cat sat on the mat.", "Stock markets fell sharply."]))

    one, two = run(using(llama_upstream(llama.embedding_url), calls))

    assert len(one.vectors) == 1 and len(two.vectors) == 2 and one.prompt_tokens > 0
    assert len(one.vectors[0]) == 576  # SmolLM2's width: per-token states mean-pooled into one vector
    assert math.isclose(math.fsum(value * value for value in one.vectors[0]), 1.0, rel_tol=1e-6)
    assert one.vectors[0] == pytest.approx(two.vectors[0], abs=1e-5)
    assert two.vectors[1] != pytest.approx(two.vectors[0], abs=1e-2)


def test_a_prompt_longer_than_the_context_is_the_caller_s_400(llama: LlamaServers) -> None:
    long_chat = GenerationRequest(model=MODEL, messages=[{"role": "user", "content": "word " * 1500}],
                                  sampling=Sampling(max_tokens=4))
    long_prompt = GenerationRequest(model=MODEL, prompt="word " * 1500, sampling=Sampling(max_tokens=4))
    for request, param in ((long_chat, "messages"), (long_prompt, "prompt")):
        with pytest.raises(InvalidRequest) as caught:
            run(using(llama_upstream(llama.chat_url), lambda upstream, r=request: upstream.generate(r)))
        assert caught.value.code == "context_length_exceeded" and caught.value.param == param
        assert "1024" in caught.value.message  # the upstream's own words


def test_health_follows_the_server(llama: LlamaServers) -> None:
    assert run(using(llama_upstream(llama.chat_url), lambda upstream: upstream.health())) is True
    nowhere = OpenAIUpstream(f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1)
    assert run(using(nowhere, lambda upstream: upstream.health())) is False


# --- a tiny OpenAI-shaped server with faults on demand -----------------------------------------------------


@dataclass
class Seen:
    scenario: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class TinyUpstream:
    """An ASGI app whose first path segment picks what it does (``{url}/{scenario}/v1/…``):

    - ``ok``: answers ``hello world`` (two chunks when streamed, then a usage chunk when ``stream_options``
      asks), embeddings in reverse index order, ``/models``.
    - ``private``: ``ok`` behind ``Authorization: Bearer API_KEY``, else 401.
    - ``slow``: answers nothing until the client leaves (5 s at most).
    - ``limited``: 429 with ``Retry-After: 7``. ``broken``: 503.
    - ``refused``: 400 in OpenAI's shape, naming ``temperature``, with a secret in its message.
    - ``toolong``: 400 in vLLM's shape (a top-level ``message``) about the context length.
    - ``drip``: streams a chunk every ``DRIP_INTERVAL_S`` (``DRIP_CHUNKS`` of them), noting when the client left.
    - ``truncated``: one chunk, then the stream ends without ``[DONE]``.
    """

    seen: list[Seen] = field(default_factory=list)
    chunks_sent: int = 0
    drip_finished: bool = False
    disconnected_at: float | None = None

    def reset(self) -> None:
        self.seen.clear()
        self.chunks_sent = 0
        self.drip_finished = False
        self.disconnected_at = None

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        scenario, _, path = scope["path"].strip("/").partition("/")
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        body = orjson.loads(raw) if raw else {}
        self.seen.append(Seen(scenario, path, headers, body))
        respond = _Responder(send)
        if scenario == "private" and headers.get("authorization") != f"Bearer {API_KEY}":
            return await respond.json(401, {"error": {"message": "Incorrect API key provided",
                                                      "code": "invalid_api_key"}})
        if scenario == "slow":
            return await _client_gone(receive, within_s=5)
        if scenario == "limited":
            return await respond.json(429, {"error": {"message": "Rate limit reached"}}, retry_after="7")
        if scenario == "broken":
            return await respond.json(503, {"error": {"message": "overloaded"}})
        if scenario == "refused":
            return await respond.json(400, {"error": {"message": f"temperature must be at most 2 (api_key={API_KEY})",
                                                      "type": "invalid_request_error", "param": "temperature"}})
        if scenario == "toolong":
            return await respond.json(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                            "message": "This model's maximum context length is 4096 tokens."})
        if scenario == "drip":
            return await self._drip(receive, respond)
        if scenario == "truncated":
            return await respond.events([_delta("hello")], done=False)
        if path == "v1/models":
            return await respond.json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        if path == "v1/embeddings":
            data = [{"object": "embedding", "index": index, "embedding": [float(index), 1.0]}
                    for index in range(len(body["input"]))]
            return await respond.json(200, {"data": data[::-1], "usage": {"prompt_tokens": 9}})
        if body.get("stream"):
            usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            return await respond.events([_delta("hello"), _delta(" world", "stop"), *([usage] if wants_usage else [])])
        return await respond.json(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                               "content": "hello world"},
                                                     "finish_reason": "stop"}],
                                        "usage": {"prompt_tokens": 11, "completion_tokens": 2}})

    async def _drip(self, receive: Callable[[], Awaitable[dict[str, Any]]], respond: _Responder) -> None:
        await respond.start(200, "text/event-stream")

        async def drip() -> None:
            for _ in range(DRIP_CHUNKS):
                await respond.chunk(b"data: " + orjson.dumps(_delta("tick ")) + b"\n\n")
                self.chunks_sent += 1
                await asyncio.sleep(DRIP_INTERVAL_S)
            await respond.chunk(b"data: [DONE]\n\n", more=False)
            self.drip_finished = True

        dripping = asyncio.create_task(drip())
        await _client_gone(receive)
        self.disconnected_at = time.monotonic()
        dripping.cancel()


async def _client_gone(receive: Callable[[], Awaitable[dict[str, Any]]], within_s: float | None = None) -> None:
    """Return once the client has closed the connection (or ``within_s`` passed)."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gone(), within_s)


@dataclass
class _Responder:
    send: Callable[[dict[str, Any]], Awaitable[None]]

    async def start(self, status: int, content_type: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-type", content_type.encode()), *(extra or [])]})

    async def chunk(self, data: bytes, *, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, body: dict[str, Any], retry_after: str | None = None) -> None:
        await self.start(status, "application/json", [(b"retry-after", retry_after.encode())] if retry_after else [])
        await self.chunk(orjson.dumps(body), more=False)

    async def events(self, chunks: list[dict[str, Any]], *, done: bool = True) -> None:
        await self.start(200, "text/event-stream")
        for chunk in chunks:
            await self.chunk(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await self.chunk(b"data: [DONE]\n\n" if done else b"", more=False)


def _delta(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}]}


@dataclass
class Tiny:
    app: TinyUpstream
    served: ServedApp

    def url(self, scenario: str) -> str:
        return f"{self.served.url}/{scenario}/v1"

    def upstream(self, scenario: str, **options: Any) -> OpenAIUpstream:
        return OpenAIUpstream(self.url(scenario), name=f"tiny-{scenario}", **options)


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[Tiny]:
    app = TinyUpstream()
    served = serve_app(app)
    yield Tiny(app=app, served=served)
    served.stop()


@pytest.fixture
def tiny(tiny_server: Tiny) -> Tiny:
    tiny_server.app.reset()
    return tiny_server


def test_the_request_body_carries_what_the_caller_set_and_nothing_else(tiny: Tiny) -> None:
    everything = Sampling(temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, max_tokens=-1, stop=("\n",), seed=3,
                          repeat_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.3)

    async def calls(upstream: OpenAIUpstream) -> None:
        await upstream.generate(chat(Sampling()))
        await upstream.generate(chat(everything, output_format=OutputFormat("json_schema", AGE_SCHEMA)))
        await upstream.generate(chat(Sampling(max_tokens=5), output_format=OutputFormat("json")))
        await collect(upstream, chat(Sampling()))

    run(using(tiny.upstream("ok"), calls))
    run(using(tiny.upstream("ok", schema_in_json_object=True, stream_usage=False), calls))

    bare = {"model": "smollm2-135m", "messages": MESSAGES}
    openai_schema = {"type": "json_schema", "json_schema": {"name": "output", "schema": AGE_SCHEMA, "strict": True}}
    sampled = {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "stop": ["\n"], "seed": 3,
               "repeat_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.3}  # no max_tokens: -1 is none
    bodies = [seen.body for seen in tiny.app.seen]
    assert [seen.path for seen in tiny.app.seen] == ["v1/chat/completions"] * 8
    assert bodies[:4] == [bare, {**bare, **sampled, "response_format": openai_schema},
                          {**bare, "max_tokens": 5, "response_format": {"type": "json_object"}},
                          {**bare, "stream": True, "stream_options": {"include_usage": True}}]
    assert bodies[4:] == [bare, {**bare, **sampled, "response_format": {"type": "json_object", "schema": AGE_SCHEMA}},
                          {**bare, "max_tokens": 5, "response_format": {"type": "json_object"}},
                          {**bare, "stream": True}]
    # without upstream_model, the public name goes out
    run(using(tiny.upstream("ok"), lambda upstream: upstream.generate(
        GenerationRequest(model=ServedModel(name="public-name"), prompt="Hi"))))
    assert tiny.app.seen[-1].path == "v1/completions" and tiny.app.seen[-1].body == {"model": "public-name",
                                                                                      "prompt": "Hi"}


def test_a_stream_takes_its_usage_from_the_last_chunk_when_the_upstream_sends_one(tiny: Tiny) -> None:
    deltas, last = run(using(tiny.upstream("ok"), lambda upstream: collect(upstream, chat())))
    assert deltas == ["hello", " world"] and last.text == "hello world" and last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (11, 2)


def test_embeddings_come_back_in_input_order(tiny: Tiny) -> None:
    embeddings = run(using(tiny.upstream("ok"), lambda upstream: upstream.embed(MODEL, ["a", "b", "c"])))
    assert embeddings.vectors == [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]] and embeddings.prompt_tokens == 9
    assert tiny.app.seen[-1].path == "v1/embeddings"
    assert tiny.app.seen[-1].body == {"model": "smollm2-135m", "input": ["a", "b", "c"]}


def test_the_api_key_goes_as_a_bearer_token_and_nowhere_else(tiny: Tiny) -> None:
    answer = run(using(tiny.upstream("private", api_key=API_KEY), lambda upstream: upstream.generate(chat())))
    assert answer.text == "hello world"
    assert tiny.app.seen[-1].headers["authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in repr(tiny.upstream("private", api_key=API_KEY))
    assert API_KEY not in redact(f"upstream said: {API_KEY}")  # registered with the log scrubber

    with pytest.raises(UpstreamError) as caught:  # a key the upstream refuses is the operator's problem
        run(using(tiny.upstream("private"), lambda upstream: upstream.generate(chat())))
    assert caught.value.status == 401 and "authorization" not in tiny.app.seen[-1].headers


def test_refusals_of_the_request_are_the_caller_s_400s(tiny: Tiny) -> None:
    with pytest.raises(InvalidRequest) as refused:
        run(using(tiny.upstream("refused"), lambda upstream: upstream.generate(chat())))
    assert refused.value.param == "temperature" and refused.value.code == "invalid_request"
    assert refused.value.message.startswith("temperature must be at most 2") and API_KEY not in refused.value.message

    with pytest.raises(InvalidRequest) as too_long:
        run(using(tiny.upstream("toolong"), lambda upstream: collect(upstream, chat())))
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "messages"
    assert "maximum context length is 4096" in too_long.value.message


@pytest.mark.parametrize(("scenario", "status", "retry_after"), [("limited", 429, 7.0), ("broken", 503, None)])
def test_rate_limits_and_server_errors_are_upstream_errors(tiny: Tiny, scenario: str, status: int,
                                                            retry_after: float | None) -> None:
    for call in (lambda upstream: upstream.generate(chat()), lambda upstream: collect(upstream, chat()),
                 lambda upstream: upstream.embed(MODEL, ["a"])):
        with pytest.raises(UpstreamError) as caught:
            run(using(tiny.upstream(scenario), call))
        assert caught.value.status == status and caught.value.retry_after == retry_after
        assert f"tiny-{scenario}" in str(caught.value)  # the operator's log names the upstream


def test_a_slow_upstream_times_out_as_504(tiny: Tiny) -> None:
    for call in (lambda upstream: upstream.generate(chat()), lambda upstream: collect(upstream, chat())):
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            run(using(tiny.upstream("slow", timeout_s=0.3), call))
        assert caught.value.status == 504 and time.monotonic() - started < 2


def test_a_stopped_upstream_is_an_upstream_error() -> None:
    app = TinyUpstream()
    served = serve_app(app)
    url = f"{served.url}/ok/v1"
    assert run(using(OpenAIUpstream(url), lambda upstream: upstream.generate(chat()))).text == "hello world"
    served.stop()
    for call in (lambda upstream: upstream.generate(chat()), lambda upstream: collect(upstream, chat()),
                 lambda upstream: upstream.embed(MODEL, ["a"])):
        with pytest.raises(UpstreamError) as caught:
            run(using(OpenAIUpstream(url, connect_timeout_s=1), call))
        assert caught.value.status == 502 and "ConnectError" in str(caught.value)


def test_a_stream_cut_before_done_is_an_upstream_error(tiny: Tiny) -> None:
    async def read(upstream: OpenAIUpstream) -> list[str]:
        deltas: list[str] = []
        with pytest.raises(UpstreamError, match=r"ended before \[DONE\]"):
            async for piece in upstream.stream(chat()):
                assert isinstance(piece, TextDelta)
                deltas.append(piece.text)
        return deltas

    assert run(using(tiny.upstream("truncated"), read)) == ["hello"]


async def _seen_leaving(app: TinyUpstream, timeout_s: float = 2.0) -> float:
    """When the tiny upstream saw the client leave, waited for while the upstream's client stays open (closing
    the client would close every connection, hiding a response left open)."""
    deadline = time.monotonic() + timeout_s
    while app.disconnected_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert app.disconnected_at is not None, "the upstream response was left open"
    return app.disconnected_at


def test_closing_a_stream_early_closes_the_upstream_response(tiny: Tiny) -> None:
    async def two_then_leave(upstream: OpenAIUpstream) -> float:
        pieces = upstream.stream(chat())
        assert isinstance(piece := await anext(pieces), TextDelta) and piece.text == "tick "
        await anext(pieces)
        await pieces.aclose()  # the caller went away
        closed_at = time.monotonic()
        return await _seen_leaving(tiny.app) - closed_at

    assert run(using(tiny.upstream("drip"), two_then_leave)) < 0.5
    assert tiny.app.chunks_sent < 10 and not tiny.app.drip_finished


def test_a_cancelled_reader_closes_the_upstream_response_too(tiny: Tiny) -> None:
    """A caller cancelled while waiting for the next piece (a route's timeout) leaves no response open."""

    async def cancelled_mid_wait(upstream: OpenAIUpstream) -> float:
        pieces: AsyncIterator[TextDelta | Generation] = upstream.stream(chat())
        await anext(pieces)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(pieces), DRIP_INTERVAL_S / 5)
        cancelled_at = time.monotonic()
        return await _seen_leaving(tiny.app) - cancelled_at

    assert run(using(tiny.upstream("drip"), cancelled_mid_wait)) < 0.5
    assert tiny.app.chunks_sent < 10 and not tiny.app.drip_finished
