"""``/v1/completions`` with ``logprobs``, ``echo`` and ``max_tokens: 0``, as evaluation harnesses call it
(lm-evaluation-harness' ``local-completions`` scores a text this way), through the official ``openai`` client:
computed by llama.cpp in process (checked against llama.cpp's own logits), passed through from an
OpenAI-compatible upstream, refused with a 400 where the backend cannot report them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.servers import serve_app

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is Paris"


def score(client: openai.OpenAI, prompt: str, top: int = 1, model: str = SMOLLM2) -> Any:
    return client.completions.create(model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=top,
                                     temperature=0).choices[0]


def test_echo_with_max_tokens_0_scores_the_prompt_without_generating(gateway: Gateway) -> None:
    choice = score(gateway.client("acme"), PROMPT, top=2)
    logprobs = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert "".join(logprobs.tokens) == PROMPT
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) \
        == len(logprobs.text_offset) > 3
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert PROMPT[offset:offset + len(token)] == token
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # SmolLM2 adds no BOS
    for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:],
                                 strict=True):
        assert value <= 0 and top[token] == pytest.approx(value) and 1 <= len(top) <= 3
        assert max(top.values()) >= value


def test_the_scores_are_llama_cpp_s_own_next_token_probabilities(gateway: Gateway) -> None:
    """Each token is scored by the logits of the position before it (not after it), which a plausible
    continuation shows: " Paris" after "The capital of France is" is far likelier than " Berlin"."""
    import llama_cpp
    import numpy as np

    from afina.core.catalog import resolve_base_model

    acme = gateway.client("acme")
    paris, berlin = score(acme, PROMPT), score(acme, "The capital of France is Berlin")
    assert paris.logprobs.tokens[-1] == " Paris" and berlin.logprobs.tokens[-1] == " Berlin"
    assert paris.logprobs.token_logprobs[-1] > berlin.logprobs.token_logprobs[-1] + 2

    llm = llama_cpp.Llama(model_path=str(resolve_base_model(SMOLLM2).gguf_path()), n_ctx=256, logits_all=True,
                          verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode(), special=True)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    expected = [float(logits[i - 1][tokens[i]] - np.log(np.exp(logits[i - 1]).sum())) for i in range(1, len(tokens))]
    assert paris.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)


def test_generated_tokens_carry_logprobs_and_echo_puts_the_prompt_in_front(gateway: Gateway) -> None:
    acme = gateway.client("acme")
    plain = acme.completions.create(model=SMOLLM2, prompt="1, 2, 3,", max_tokens=3, logprobs=2, temperature=0)
    choice = plain.choices[0]
    assert choice.text and "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == plain.usage.completion_tokens
    for token, value, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs,
                                 strict=True):
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))  # greedy
    echoed = acme.completions.create(model=SMOLLM2, prompt="1, 2, 3,", max_tokens=3, logprobs=0, echo=True,
                                     temperature=0).choices[0]
    assert echoed.text == "1, 2, 3," + choice.text
    assert "".join(echoed.logprobs.tokens) == echoed.text
    assert echoed.logprobs.token_logprobs[-3:] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-3)
    no_logprobs = acme.completions.create(model=SMOLLM2, prompt="1, 2, 3,", max_tokens=0, echo=True).choices[0]
    assert no_logprobs.text == "1, 2, 3," and no_logprobs.logprobs is None


def test_max_tokens_0_alone_generates_nothing(gateway: Gateway) -> None:
    completion = gateway.client("acme").completions.create(model=SMOLLM2, prompt="Once upon a time", max_tokens=0)
    assert completion.choices[0].text == "" and completion.usage.completion_tokens == 0
    assert completion.usage.prompt_tokens == 4


def test_a_prompt_of_token_ids_is_scored_id_for_id_as_lm_evaluation_harness_sends_it(gateway: Gateway) -> None:
    """lm-evaluation-harness' ``local-completions`` sends the ids of its own tokenizer, ``echo``, ``max_tokens`` 1
    and ``logprobs`` 1, and reads ``token_logprobs[ctxlen:-1]``: every id must come back as one token, in order."""
    import llama_cpp

    from afina.core.catalog import resolve_base_model

    llm = llama_cpp.Llama(model_path=str(resolve_base_model(SMOLLM2).gguf_path()), n_ctx=64, vocab_only=True,
                          verbose=False)
    ids = llm.tokenize(PROMPT.encode(), special=True)
    vocabulary = llm.n_vocab()
    llm.close()
    acme = gateway.client("acme")
    choice = acme.completions.create(model=SMOLLM2, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0,
                                     seed=1234).choices[0]
    assert len(choice.logprobs.tokens) == len(ids) + 1 and choice.text.startswith(PROMPT)
    by_text = score(acme, PROMPT).logprobs.token_logprobs
    assert choice.logprobs.token_logprobs[:len(ids)] == pytest.approx(by_text, abs=1e-3)
    with pytest.raises(openai.BadRequestError) as caught:
        acme.completions.create(model=SMOLLM2, prompt=[1, vocabulary], echo=True, max_tokens=0, logprobs=1)
    assert caught.value.body["param"] == "prompt" and str(vocabulary) in caught.value.body["message"]


def test_logprobs_are_not_streamed(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client("acme").completions.create(model=SMOLLM2, prompt="x", logprobs=1, stream=True)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "logprobs"


# --- an OpenAI-compatible upstream: passed through ---------------------------------------------------------

UPSTREAM_LOGPROBS = {"tokens": ["Hi", " there"], "token_logprobs": [None, -0.25],
                     "top_logprobs": [None, {" there": -0.25, " you": -1.5}], "text_offset": [0, 2]}


class CompletionsUpstream:
    """Answers ``/v1/completions`` with fixed logprobs and keeps the bodies it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        request = json.loads(body or b"{}")
        self.bodies.append(request)
        answer = {"id": "cmpl-up", "object": "text_completion", "created": 0, "model": request.get("model"),
                  "choices": [{"index": 0, "text": "Hi there", "finish_reason": "length",
                               "logprobs": UPSTREAM_LOGPROBS if "logprobs" in request else None}],
                  "usage": {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


@pytest.fixture(scope="module")
def upstream_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, CompletionsUpstream]]:
    app = CompletionsUpstream()
    served = serve_app(app)
    settings = make_settings(tmp_path_factory.mktemp("logprobs-home"),
                             upstreams={"up": {"kind": "openai", "base_url": f"{served.url}/v1"}})
    gateway = start_gateway(settings)
    response = httpx.put(f"{gateway.url}/v1/routes/scorer", json={"targets": [{"model": "m", "upstream": "up"}]},
                         headers={"Authorization": f"Bearer {gateway.keys['acme']}"})
    assert response.status_code == 200, response.text
    yield gateway, app
    gateway.served.stop()
    gateway.runtime.db.dispose()
    served.stop()


def test_an_openai_compatible_upstream_s_logprobs_are_passed_through(
        upstream_gateway: tuple[Gateway, CompletionsUpstream]) -> None:
    gateway, app = upstream_gateway
    choice = score(gateway.client("acme"), "Hi there", top=2, model="scorer")
    assert app.bodies[-1]["logprobs"] == 2 and app.bodies[-1]["echo"] is True and app.bodies[-1]["max_tokens"] == 0
    assert choice.text == "Hi there"
    assert choice.logprobs.model_dump() == UPSTREAM_LOGPROBS
