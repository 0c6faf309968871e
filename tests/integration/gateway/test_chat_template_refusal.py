"""A chat the model's own template refuses answers 400 naming the message, through real llama.cpp in process:
the served GGUF is SmolLM2's weights with Gemma 2's chat template, which refuses a system message and two
user turns in a row (llama-cpp-python raises a bare ValueError for it, which answered 500)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from afina.core.catalog import CATALOG, GEMMA2
from afina.core.datasets.layout import model_prefix
from afina.core.db import repository as repo
from afina.core.naming import fine_tuned_model_name
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.gateway_objects import served_artifacts
from tests.support.servers import free_port

pytestmark = pytest.mark.slow  # llama.cpp inference
SYSTEM_FIRST = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
TWO_USERS = [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's GGUF with Gemma 2's chat template in its metadata."""
    template_file = tmp_path_factory.mktemp("template") / "gemma2.jinja"
    template_file.write_text(GEMMA2.stock_template)
    gguf = template_file.parent / "model-q4_k_m.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--chat-template-file",
                    str(template_file), str(CATALOG[SMOLLM2].gguf_path()), str(gguf)],
                   check=True, capture_output=True, timeout=300)
    return gguf


def register(gateway: Gateway, gguf: Path) -> str:
    """A fine-tune of acme whose served artifact is ``gguf``; its public name."""
    job_id = "ftjob-" + "9e" * 12
    name = fine_tuned_model_name(SMOLLM2, "acme", "gemma-template", job_id)
    key = f"{model_prefix('acme', job_id)}/model-q4_k_m.gguf"
    gateway.runtime.store.put_file(key, gguf)
    with gateway.runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id="acme", base_model=SMOLLM2, job_id=job_id,
                            artifacts=served_artifacts("acme", job_id, {"q4_k_m": key}))
    return name


@pytest.fixture(scope="module")
def gemma_templated(gateway: Gateway, gemma_gguf: Path) -> str:
    return register(gateway, gemma_gguf)


@pytest.fixture
def server_gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = make_settings(tmp_path / "home", inference_backend="llamacpp-server",
                             llamacpp_server_base_port=free_port(), max_loaded_models=1)
    gateway = start_gateway(settings, tenants=("acme",))
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(("messages", "where", "why"), [
    (SYSTEM_FIRST, "messages[0]", "System role not supported"),
    (TWO_USERS, "messages[1]", "Conversation roles must alternate"),
])
def test_a_conversation_the_template_refuses_is_a_400_naming_the_message(
        acme, gemma_templated: str, messages: list, where: str, why: str, stream: bool) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError) as caught:
        result = acme.chat.completions.create(model=gemma_templated, messages=messages, max_tokens=4,
                                              stream=stream)
        if stream:
            list(result)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert (error["param"], error["code"]) == (where, "chat_template_error")
    assert why in error["message"] and where in error["message"]


def test_a_conversation_the_template_accepts_is_answered(acme, gemma_templated: str) -> None:  # noqa: ANN001
    completion = acme.chat.completions.create(model=gemma_templated, messages=TWO_USERS[1:], max_tokens=4,
                                              temperature=0, seed=1)
    assert completion.choices[0].message.role == "assistant" and completion.usage.prompt_tokens > 0


def test_the_catalog_model_still_takes_a_system_message(acme) -> None:  # noqa: ANN001
    completion = acme.chat.completions.create(model=SMOLLM2, messages=SYSTEM_FIRST, max_tokens=4, temperature=0)
    assert completion.choices[0].message.content is not None



def test_a_llama_cpp_server_refusing_by_template_is_a_400_too(server_gateway: Gateway, gemma_gguf: Path) -> None:
    # llama_cpp.server answers the template's refusal with a 500; the gateway finds the reason in the GGUF
    name = register(server_gateway, gemma_gguf)
    client = server_gateway.client("acme")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=name, messages=SYSTEM_FIRST, max_tokens=4)
    assert (caught.value.body["param"], caught.value.body["code"]) == ("messages[0]", "chat_template_error")
    assert client.chat.completions.create(model=name, messages=TWO_USERS[1:], max_tokens=4).choices
