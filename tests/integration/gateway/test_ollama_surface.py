"""The gateway's Ollama API driven by the official ``ollama`` client, unchanged, over real llama.cpp (SmolLM2)."""

from __future__ import annotations

import json
import math

import httpx
import ollama
import pytest

from tests.integration.gateway.conftest import SMOLLM2, Gateway

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello in one word."}]


def client(gateway: Gateway, tenant: str = "acme") -> ollama.Client:
    return ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {gateway.keys[tenant]}"}, timeout=120)


def test_chat_streamed_and_whole(gateway: Gateway) -> None:
    acme = client(gateway)
    whole = acme.chat(model=SMOLLM2, messages=MESSAGES, options={"num_predict": 8, "temperature": 0}, stream=False)
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert whole.done_reason in ("stop", "length")
    assert whole.eval_count and 0 < whole.eval_count <= 8 and whole.prompt_eval_count
    assert whole.total_duration and whole.total_duration >= (whole.eval_duration or 0) > 0

    parts = list(acme.chat(model=SMOLLM2, messages=MESSAGES, options={"num_predict": 8, "temperature": 0},
                           stream=True))
    assert [part.done for part in parts][-1] is True and not any(part.done for part in parts[:-1])
    assert "".join(part.message.content for part in parts) == whole.message.content  # greedy: the same answer
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_generate_prompt_raw_and_options(gateway: Gateway) -> None:
    acme = client(gateway)
    answer = acme.generate(model=SMOLLM2, prompt="Name a colour.", options={"num_predict": 5, "temperature": 0})
    assert answer.done and answer.response and answer.eval_count <= 5
    raw = acme.generate(model=SMOLLM2, prompt="1, 2, 3, 4,", raw=True, stream=False,
                        options={"num_predict": 12, "temperature": 0, "stop": ["7"]})
    assert raw.response.startswith(" 5, 6") and "7" not in raw.response and raw.done_reason == "stop"
    templated = acme.generate(model=SMOLLM2, prompt="1, 2, 3, 4,", options={"num_predict": 1})
    assert raw.prompt_eval_count < templated.prompt_eval_count  # no chat template around a raw prompt
    seeded = [acme.generate(model=SMOLLM2, prompt="Tell a story.", options={"num_predict": 8, "temperature": 1.0,
                                                                            "seed": 42}).response for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_format_json_and_schema(gateway: Gateway) -> None:
    acme = client(gateway)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    answer = acme.chat(model=SMOLLM2, messages=[{"role": "user", "content": "Answer as JSON."}], format=schema,
                       options={"num_predict": 24, "temperature": 0})
    parsed = json.loads(answer.message.content)
    assert isinstance(parsed["ok"], bool) and isinstance(parsed["n"], int)
    # any JSON object: the grammar allows nothing else from the first token on (the answer may be cut short)
    loose = acme.generate(model=SMOLLM2, prompt="Reply in JSON.", format="json",
                          options={"num_predict": 6, "temperature": 0})
    assert loose.response.lstrip().startswith("{")
    assert loose.done_reason == "length" or isinstance(json.loads(loose.response), dict)


def test_tags_show_ps_version_and_embed(gateway: Gateway) -> None:
    acme = client(gateway)
    acme.chat(model=SMOLLM2, messages=MESSAGES, options={"num_predict": 1})
    listed = {model.model: model for model in acme.list().models}
    assert listed[SMOLLM2].details.family == "llama" and listed[SMOLLM2].size > 0
    assert len(listed[SMOLLM2].digest) == 64
    shown = acme.show(SMOLLM2)
    assert "<|im_end|>" in (shown.parameters or "") and "{{" in (shown.template or "")
    assert shown.modelinfo["general.architecture"] == "llama" and shown.details.family == "llama"
    running = {model.model for model in acme.ps().models}
    assert SMOLLM2 in running
    assert httpx.get(f"{gateway.url}/api/version").json()["version"]
    assert httpx.get(f"{gateway.url}/").text == "Ollama is running"
    vectors = acme.embed(model=SMOLLM2, input=["the sky is blue", "o céu é azul"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 576
    assert all(math.isclose(math.sqrt(sum(value * value for value in vector)), 1.0, rel_tol=1e-4)
               for vector in vectors)
    legacy = acme.embeddings(model=SMOLLM2, prompt="the sky is blue").embedding  # the older single-prompt route
    assert legacy == pytest.approx(vectors[0], abs=1e-5)


def test_keep_alive_zero_unloads(gateway: Gateway) -> None:
    acme = client(gateway)
    acme.generate(model=SMOLLM2, prompt="hi", options={"num_predict": 1})
    unloaded = acme.generate(model=SMOLLM2, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert SMOLLM2 not in {model.model for model in acme.ps().models}


def test_errors_in_ollamas_shape(gateway: Gateway) -> None:
    acme = client(gateway)
    with pytest.raises(ollama.ResponseError) as caught:
        acme.chat(model="no-such-model", messages=MESSAGES)
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        acme.chat(model=SMOLLM2, messages=MESSAGES, options={"num_ctx": 10**7})
    assert caught.value.status_code == 400 and "num_ctx" in caught.value.error
    key = {"Authorization": f"Bearer {gateway.keys['acme']}"}
    for body in ({"model": SMOLLM2, "messages": "not a list"}, {"model": SMOLLM2, "options": {"temperature": "hot"},
                                                                 "messages": MESSAGES}):
        response = httpx.post(f"{gateway.url}/api/chat", json=body, headers=key)
        assert response.status_code == 400 and isinstance(response.json()["error"], str)
    response = httpx.post(f"{gateway.url}/api/chat", content=b"{not json", headers=key)
    assert response.status_code == 400 and set(response.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=gateway.url).list()
    assert caught.value.status_code == 401


def test_another_tenants_fine_tune_is_not_found(gateway: Gateway, fine_tune: str) -> None:
    globex = client(gateway, "globex")
    with pytest.raises(ollama.ResponseError) as caught:
        globex.chat(model=fine_tune, messages=MESSAGES)
    assert caught.value.status_code == 404
    assert fine_tune not in {model.model for model in globex.list().models}
    assert fine_tune in {model.model for model in client(gateway).list().models}
    answer = client(gateway).chat(model=fine_tune, messages=MESSAGES, options={"num_predict": 2})
    assert answer.done
    assert fine_tune not in {model.model for model in globex.ps().models}  # loaded, but not globex's to see
    for name in (fine_tune, fine_tune.replace("ftjob-", "ftjob-0")):  # acme's model answers like a missing one
        with pytest.raises(ollama.ResponseError) as caught:
            globex.delete(name)
        assert caught.value.status_code == 404 and "does not exist" in caught.value.error
    assert fine_tune in {model.model for model in client(gateway).list().models}
