"""Routes (aliases, a sticky A/B split, a fallback chain, defaults) and the completed OpenAI surface
(completions, embeddings, response_format, n), driven by the official ``openai`` and ``ollama`` clients."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]
TARGET = "x-afina-target"


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with an upstream that is down (nothing listens on its port): the cloud of ``seeds/003``."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = make_settings(tmp_path_factory.mktemp("routed-home"), inference_n_ctx=512,
                             upstreams={"cloud": {"kind": "openai", "base_url": dead, "timeout_s": 5}})
    gateway = start_gateway(settings)
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


def put_route(gateway: Gateway, name: str, spec: dict, tenant: str = "acme") -> httpx.Response:
    return httpx.put(f"{gateway.url}/v1/routes/{name}", json=spec,
                     headers={"Authorization": f"Bearer {gateway.keys[tenant]}"}, timeout=30)


def test_a_fallback_answers_when_the_cloud_is_down(routed: Gateway) -> None:
    response = put_route(routed, "aeon-custom", {"targets": [{"model": "llama-3.1-8b-instant", "upstream": "cloud"}],
                                                  "fallbacks": [{"model": SMOLLM2}],
                                                  "system": "You are Aeon.", "options": {"max_tokens": 4}})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "route"
    acme = routed.client("acme")
    raw = acme.chat.completions.with_raw_response.create(model="aeon-custom", messages=MESSAGES)
    assert raw.headers[TARGET] == SMOLLM2
    completion = raw.parse()
    assert completion.model == "aeon-custom" and completion.usage.completion_tokens <= 4  # the route's default
    # the same alias through Ollama's API, as the Aeon assistant calls it
    aeon = ollama.Client(host=routed.url, headers={"Authorization": f"Bearer {routed.keys['acme']}"})
    assert aeon.chat(model="aeon-custom", messages=MESSAGES).message.content
    assert "aeon-custom" in {model.id for model in acme.models.list()}
    assert "aeon-custom" in {model.model for model in aeon.list().models}


def test_without_a_fallback_the_upstream_failure_is_a_502(routed: Gateway) -> None:
    assert put_route(routed, "cloud-only", {"targets": [{"model": "m", "upstream": "cloud"}]}).status_code == 200
    with pytest.raises(openai.APIStatusError) as caught:
        routed.client("acme").chat.completions.create(model="cloud-only", messages=MESSAGES)
    assert caught.value.status_code == 502 and "127.0.0.1" not in caught.value.message


def test_an_ab_split_is_sticky_per_user_and_moves_in_one_call(routed: Gateway) -> None:
    spec = {"targets": [{"model": SMOLLM2, "weight": 1}, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                          "weight": 1}], "options": {"max_tokens": 1}}
    # two spellings of one model are two targets to the route: their labels tell the sides apart
    assert put_route(routed, "ab", spec).status_code == 200
    acme = routed.client("acme")
    sides = {}
    for user in (f"user-{index}" for index in range(16)):
        seen = {acme.chat.completions.with_raw_response.create(model="ab", messages=MESSAGES, user=user)
                .headers[TARGET] for _ in range(2)}
        assert len(seen) == 1, f"{user} switched sides: {seen}"
        sides[user] = seen.pop()
    assert set(Counter(sides.values())) == {SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct"}
    # the header works as well as the body's user field
    header = {"x-afina-user": "user-3"}
    assert acme.chat.completions.with_raw_response.create(model="ab", messages=MESSAGES,
                                                          extra_headers=header).headers[TARGET] == sides["user-3"]
    moved = put_route(routed, "ab", {"targets": [{"model": SMOLLM2}], "options": {"max_tokens": 1}})
    assert moved.status_code == 200
    assert {acme.chat.completions.with_raw_response.create(model="ab", messages=MESSAGES, user=user)
            .headers[TARGET] for user in sides} == {SMOLLM2}


def test_routes_are_checked_listed_and_scoped(routed: Gateway) -> None:
    for name, spec, param in (("x", {"targets": [{"model": "no-such-model"}]}, "targets.0.model"),
                              ("x", {"targets": [{"model": "m", "upstream": "nowhere"}]}, "targets.0.model"),
                              ("ft:sneaky", {"targets": [{"model": SMOLLM2}]}, "name"),
                              (SMOLLM2, {"targets": [{"model": SMOLLM2}]}, "name"),
                              ("x", {"targets": []}, "targets"),
                              ("x", {"targets": [{"model": SMOLLM2, "weight": 0}]}, "targets")):
        response = put_route(routed, name, spec)
        assert response.status_code == 400, (name, spec, response.text)
        assert response.json()["error"]["param"] == param
    assert put_route(routed, "mine", {"targets": [{"model": SMOLLM2}]}).status_code == 200
    globex = {"Authorization": f"Bearer {routed.keys['globex']}"}
    assert httpx.get(f"{routed.url}/v1/routes/mine", headers=globex).status_code == 404
    listed = httpx.get(f"{routed.url}/v1/routes", headers=globex).json()["data"]
    assert "mine" not in [route["name"] for route in listed]
    with pytest.raises(openai.NotFoundError):
        routed.client("globex").chat.completions.create(model="mine", messages=MESSAGES, max_tokens=1)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=routed.url, headers=globex).chat(model="mine", messages=MESSAGES)
    assert caught.value.status_code == 404
    acme = {"Authorization": f"Bearer {routed.keys['acme']}"}
    assert httpx.delete(f"{routed.url}/v1/routes/mine", headers=acme).json()["deleted"] is True
    assert httpx.get(f"{routed.url}/v1/routes/mine", headers=acme).status_code == 404


def test_completions_embeddings_response_format_and_n(routed: Gateway) -> None:
    acme = routed.client("acme")
    completion = acme.completions.create(model=SMOLLM2, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=4, temperature=0)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.choices[0].text.startswith(" 4") and completion.usage.completion_tokens <= 8
    streamed = "".join(chunk.choices[0].text for chunk in acme.completions.create(
        model=SMOLLM2, prompt="1, 2, 3,", max_tokens=4, temperature=0, stream=True) if chunk.choices)
    assert streamed == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        acme.completions.create(model=SMOLLM2, prompt="x", suffix="y")
    assert caught.value.body["param"] == "suffix"

    vectors = acme.embeddings.create(model=SMOLLM2, input=["hello", "olá"])  # the client asks for base64
    assert [item.index for item in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 576
    floats = acme.embeddings.create(model=SMOLLM2, input="hello", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors.data[0].embedding, rel=1e-6)

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    structured = acme.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "JSON please"}], max_tokens=12, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert isinstance(json.loads(structured.choices[0].message.content)["ok"], bool)

    several = acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, n=2, max_tokens=4, seed=7,
                                           temperature=1.0)
    assert [choice.index for choice in several.choices] == [0, 1]
    again = acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, n=2, max_tokens=4, seed=7, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]


def test_metrics_and_the_access_log_name_model_route_and_tenant_never_the_prompt(
        routed: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    assert put_route(routed, "metered", {"targets": [{"model": "m", "upstream": "cloud"}],
                                         "fallbacks": [{"model": SMOLLM2}]}).status_code == 200
    secret_prompt = [{"role": "user", "content": "my card is 4111 1111 1111 1111"}]
    acme = routed.client("acme")
    with caplog.at_level("INFO", logger="afina.gateway.access"):
        acme.chat.completions.create(model="metered", messages=secret_prompt, max_tokens=2)
        list(acme.chat.completions.create(model="metered", messages=secret_prompt, max_tokens=2, stream=True))
    exposition = httpx.get(f"{routed.url}/metrics").text
    labels = f'model="{SMOLLM2}",route="metered",tenant="acme"'
    assert f"afina_inference_request_seconds_count{{{labels}}} 2.0" in exposition
    assert f"afina_inference_time_to_first_token_seconds_count{{{labels}}} 1.0" in exposition
    assert f'afina_inference_exchange_tokens_total{{kind="completion",{labels}}}' in exposition
    assert 'afina_inference_fallbacks_total{failed_target="cloud/m",route="metered"} 2.0' in exposition
    answered = [record for record in caplog.records if record.getMessage() == "inference.answered"]
    assert len(answered) == 2 and {record.fields["route"] for record in answered} == {"metered"}
    assert all("4111" not in str(record.fields) for record in answered)
