"""The gateway in front of Ollama (``AFINA_INFERENCE_BACKEND=ollama``): a fine-tune the exporter registered in
Ollama is served by that Ollama, through both of the gateway's APIs, driven by the official clients; a caller
hanging up stops Ollama's generation; an Ollama that goes down is covered by a route's local fallback.
Ollama is the contract server of ``tests.support.ollama_server`` (generating with llama.cpp)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import ollama
import pytest

from afina.core.catalog import CHATML, resolve_base_model
from afina.core.datasets.layout import model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Model
from afina.core.naming import fine_tuned_model_name
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.gateway_objects import served_artifacts
from tests.support.ollama_server import ContractOllama

pytestmark = pytest.mark.integration

OLLAMA_NAME = "acme-greeter"
COOLDOWN_S = 2.0  # the circuit breaker's (settings.upstream_cooldown_s): short, so a test can outwait it
MESSAGES = [{"role": "user", "content": "Count from one to ten."}]


@dataclass
class Stack:
    gateway: Gateway
    ollama: ContractOllama
    fine_tune: str

    def client(self, tenant: str = "acme") -> ollama.Client:
        return ollama.Client(host=self.gateway.url, headers={"Authorization": f"Bearer {self.gateway.keys[tenant]}"},
                             timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    contract = ContractOllama(tmp_path_factory.mktemp("ollama")).start()
    gateway = None
    try:
        registrar = ollama.Client(host=contract.url)
        digest = registrar.create_blob(resolve_base_model(SMOLLM2).gguf_path())
        registrar.create(model=OLLAMA_NAME, files={"model.gguf": digest}, template=CHATML.ollama_template,
                         parameters={"stop": list(CHATML.stop), "num_ctx": 512})
        settings = make_settings(tmp_path_factory.mktemp("gateway-home"), inference_backend="ollama",
                                 ollama_url=contract.url, inference_n_ctx=512, upstream_cooldown_s=COOLDOWN_S)
        gateway = start_gateway(settings)
        job_id = "ftjob-" + "cd" * 12
        name = fine_tuned_model_name(SMOLLM2, "acme", "greeter", job_id)
        key = f"{model_prefix('acme', job_id)}/model-q4_k_m.gguf"
        with gateway.runtime.db.session() as session:  # what the exporter leaves after an Ollama registration
            repo.register_model(session, name=name, tenant_id="acme", base_model=SMOLLM2, job_id=job_id,
                                artifacts=served_artifacts("acme", job_id, {"q4_k_m": key}))
            session.get(Model, name).ollama = {"name": f"{OLLAMA_NAME}:latest", "status": "registered",
                                               "updated_at": int(time.time())}
        yield Stack(gateway, contract, name)
    finally:
        if gateway is not None:
            gateway.served.stop()
            gateway.runtime.db.dispose()
        contract.stop()


def test_a_fine_tune_registered_in_ollama_is_served_by_it_on_both_apis(stack: Stack) -> None:
    before = len(stack.ollama.state.generations)
    answer = stack.client().chat(model=stack.fine_tune, messages=MESSAGES, options={"num_predict": 6,
                                                                                   "temperature": 0})
    assert answer.done and answer.message.content and answer.eval_count <= 6
    openai_answer = stack.gateway.client("acme").chat.completions.create(
        model=stack.fine_tune, messages=MESSAGES, max_tokens=6, temperature=0)
    assert openai_answer.choices[0].message.content == answer.message.content  # one model, greedy
    assert len(stack.ollama.state.generations) == before + 2  # both answered by Ollama, not in process
    with pytest.raises(ollama.ResponseError) as caught:  # another tenant: as if it did not exist
        stack.client("globex").chat(model=stack.fine_tune, messages=MESSAGES)
    assert caught.value.status_code == 404


def test_a_caller_hanging_up_stops_ollamas_generation(stack: Stack) -> None:
    before = len(stack.ollama.state.generations)
    headers = {"Authorization": f"Bearer {stack.gateway.keys['acme']}"}
    body = {"model": stack.fine_tune, "messages": MESSAGES, "options": {"num_predict": 400, "temperature": 0}}
    with httpx.stream("POST", f"{stack.gateway.url}/api/chat", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first piece, then hang up
    (tally,) = stack.ollama.state.generations[before:]
    deadline = time.monotonic() + 30
    while not tally.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tally.stopped and not tally.completed and tally.tokens < 40  # of the 400 asked for


def test_a_route_falls_back_to_the_local_model_while_ollama_is_down(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.gateway.keys['acme']}"}
    route = {"targets": [{"model": stack.fine_tune}], "fallbacks": [{"model": SMOLLM2}]}
    assert httpx.put(f"{stack.gateway.url}/v1/routes/aeon-custom", json=route, headers=headers).status_code == 200
    acme = stack.gateway.client("acme")
    served = acme.chat.completions.with_raw_response.create(model="aeon-custom", messages=MESSAGES, max_tokens=2)
    assert served.headers["x-afina-target"] == stack.fine_tune
    stack.ollama.go_down()
    try:
        covered = acme.chat.completions.with_raw_response.create(model="aeon-custom", messages=MESSAGES,
                                                                 max_tokens=2)
        assert covered.headers["x-afina-target"] == SMOLLM2  # llama.cpp in the gateway's own process
        with pytest.raises(ollama.ResponseError) as caught:  # no route: the failure is the caller's to see
            stack.client().chat(model=stack.fine_tune, messages=MESSAGES)
        assert caught.value.status_code == 502 and "127.0.0.1" not in caught.value.error
    finally:
        stack.ollama.come_back()
    # the circuit breaker: the fine-tune that just failed is skipped for the cool-down (no wait on a model that
    # is probably still down), then asked again
    cooling = acme.chat.completions.with_raw_response.create(model="aeon-custom", messages=MESSAGES, max_tokens=2)
    assert cooling.headers["x-afina-target"] == SMOLLM2
    time.sleep(COOLDOWN_S + 0.2)
    again = acme.chat.completions.with_raw_response.create(model="aeon-custom", messages=MESSAGES, max_tokens=2)
    assert again.headers["x-afina-target"] == stack.fine_tune


def test_ollamas_loaded_models_are_listed_by_the_tenants_names(stack: Stack) -> None:
    stack.client().chat(model=stack.fine_tune, messages=MESSAGES, options={"num_predict": 1})
    assert stack.fine_tune in {model.model for model in stack.client().ps().models}
    assert stack.fine_tune not in {model.model for model in stack.client("globex").ps().models}
    assert not any(OLLAMA_NAME in model.model for model in stack.client().ps().models)  # Ollama's name stays inside
