"""Capture for retraining end to end, through the official ``openai`` and ``ollama`` clients against a real
gateway (llama.cpp in process, SmolLM2): a route with capture on keeps every chat of both surfaces redacted,
takes feedback by completion id, serves a JSONL that afina's own ingest accepts, and starts exactly one
retraining job (continuing the fine-tune, with its training data) when ``retrain_after`` is reached. Another
tenant sees none of it, and an inference-only key cannot read it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from afina.core.db import repository as repo
from tests.integration.gateway.conftest import (
    SMOLLM2,
    Gateway,
    chat_jsonl,
    make_settings,
    register_fine_tune,
    start_gateway,
)
from tests.support.models import shared_model_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of this module's own: capture uploads files and starts jobs the package's other tests would see."""
    served = start_gateway(make_settings(tmp_path_factory.mktemp("capture-home")))
    yield served
    served.served.stop()
    served.runtime.db.dispose()


@pytest.fixture(scope="module")
def fine_tune(gateway: Gateway) -> str:
    return register_fine_tune(gateway)

ROUTE = "aeon/capture"  # a slash, as route names may have
SECRET_EMAIL, SECRET_CPF = "ana.souza@exemplo.com.br", "123.456.789-09"
QUESTION = f"Oi! Sou a Ana, {SECRET_EMAIL}, CPF {SECRET_CPF}. Meu pedido 7001 chegou?"
RETRAIN_AFTER = 12


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(gateway: Gateway, scopes: list[str]) -> str:
    with gateway.runtime.db.session() as session:
        return repo.create_api_key(session, "acme", scopes=scopes, name=f"capture-{'-'.join(scopes)}")


def api(gateway: Gateway, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{gateway.url}{path}", headers=headers(key), timeout=120, **kwargs)


def captures(gateway: Gateway, key: str | None = None, **params: Any) -> list[dict[str, Any]]:
    response = api(gateway, "GET", f"/v1/routes/{ROUTE}/captures", key or gateway.keys["acme"],
                   params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and not body["has_more"]
    return body["data"]


def route_jobs(acme: openai.OpenAI) -> list[Any]:
    return [job for job in acme.fine_tuning.jobs.list(limit=100)
            if (job.metadata or {}).get("afina_route") == ROUTE]


def ingest_in_process(gateway: Gateway, file_id: str, model_cache: Path) -> str:
    """What the ingest worker does with an upload (no worker runs beside these tests), with the session's shared
    model cache so the tokenizer is built once for every test package."""
    from afina.core.runtime import Runtime
    from afina.ingest.process_file import process_uploaded_file

    runtime = Runtime(gateway.runtime.settings.model_copy(update={"model_cache_dir": model_cache}))
    try:
        return process_uploaded_file(runtime, file_id)
    finally:
        runtime.db.dispose()


def test_capture_feedback_dataset_and_retraining(gateway: Gateway, fine_tune: str,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    acme = gateway.client("acme")
    admin_key = gateway.keys["acme"]  # a key from before scopes: every scope
    original = acme.files.create(file=("original.jsonl", chat_jsonl(12)), purpose="fine-tune")
    spec = {"targets": [{"model": fine_tune}], "system": "Você é a Aeon, assistente da loja.",
            "options": {"max_tokens": 2, "temperature": 0},
            "capture": {"retrain_after": RETRAIN_AFTER, "training_file": original.id, "include_feedback": "positive"}}
    put = api(gateway, "PUT", f"/v1/routes/{ROUTE}", admin_key, json=spec)
    assert put.status_code == 200, put.text
    assert put.json()["capture"]["redact"] == ["email", "phone", "cpf", "cnpj"]

    # chats through both surfaces: OpenAI whole and streamed, Ollama chat and generate
    whole = acme.chat.completions.create(model=ROUTE, messages=[{"role": "user", "content": QUESTION}])
    streamed_id = {chunk.id for chunk in acme.chat.completions.create(
        model=ROUTE, messages=[{"role": "user", "content": "Meu telefone é (11) 91234-5678."}], stream=True)}.pop()
    aeon = ollama.Client(host=gateway.url, headers=headers(admin_key), timeout=120)
    assert aeon.chat(model=ROUTE, messages=[{"role": "user", "content": f"{QUESTION} Responda pelo Ollama."}],
                     options={"num_predict": 2}).done
    # Ollama's answers have no id: the exchange's is in a header, for feedback
    raw_ollama = api(gateway, "POST", "/api/chat", admin_key, json={
        "model": ROUTE, "stream": False, "options": {"num_predict": 1},
        "messages": [{"role": "user", "content": "Pode ligar em +55 21 3456-7890?"}]})
    assert raw_ollama.status_code == 200
    ollama_exchange = raw_ollama.headers["x-afina-exchange-id"]
    assert aeon.generate(model=ROUTE, prompt=f"CNPJ 12.345.678/0001-95, e-mail {SECRET_EMAIL}",
                         options={"num_predict": 1}).done
    acme.completions.create(model=ROUTE, prompt="1, 2, 3,", max_tokens=1)  # a raw prompt: not a chat, not kept
    kept = captures(gateway)
    assert len(kept) == 5 and {item["route"] for item in kept} == {ROUTE}
    assert {item["target"] for item in kept} == {fine_tune}
    text = json.dumps(kept, ensure_ascii=False)
    assert SECRET_EMAIL not in text and SECRET_CPF not in text and "91234-5678" not in text
    assert "[email]" in text and "[cpf]" in text and "[phone]" in text and "[cnpj]" in text
    by_id = {item["completion_id"]: item for item in kept}
    first = by_id[whole.id]
    assert first["messages"] == [
        {"role": "system", "content": "Você é a Aeon, assistente da loja."},
        {"role": "user", "content": "Oi! Sou a Ana, [email], CPF [cpf]. Meu pedido 7001 chegou?"}]
    assert first["answer"] == whole.choices[0].message.content and first["feedback"] is None
    assert streamed_id in by_id
    assert by_id[f"chatcmpl-{ollama_exchange}"]["messages"][-1]["content"] == "Pode ligar em [phone]?"

    # feedback: up by chatcmpl id, a correction by the bare id, down without one (the Ollama chat, by its header)
    for completion, body, expected in (
            (whole.id, {"rating": "up"}, ("up", None)),
            (streamed_id.removeprefix("chatcmpl-"), {"rating": "down", "correction": "Anotei: ligo em (21) 3456-7890."},
             ("down", "Anotei: ligo em [phone].")),
            (ollama_exchange, {"rating": "down", "correction": None}, ("down", None))):
        response = api(gateway, "POST", f"/v1/chat/completions/{completion}/feedback", admin_key, json=body)
        assert response.status_code == 200, response.text
        assert (response.json()["feedback"], response.json()["correction"]) == expected
    bad = api(gateway, "POST", f"/v1/chat/completions/{whole.id}/feedback", admin_key, json={"rating": "meh"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    missing = api(gateway, "POST", "/v1/chat/completions/chatcmpl-000000000000000000000000/feedback", admin_key,
                  json={"rating": "up"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "completion_not_found"

    # up to one exchange short of retrain_after: no job yet
    for index in range(RETRAIN_AFTER - 5 - 1):
        acme.chat.completions.create(model=ROUTE, max_tokens=1,
                                     messages=[{"role": "user", "content": f"Pergunta {index}: qual o prazo?"}])
    assert len(captures(gateway)) == RETRAIN_AFTER - 1 and route_jobs(acme) == []

    # the JSONL (positive: the answer thumbed down without a correction left out) passes afina's own ingest
    download = api(gateway, "GET", f"/v1/routes/{ROUTE}/captures/content", admin_key)
    assert download.status_code == 200 and download.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in download.text.splitlines()]
    assert len(lines) == RETRAIN_AFTER - 2
    assert all(line["messages"][-1]["role"] == "assistant" for line in lines)
    assert {"role": "assistant", "content": "Anotei: ligo em [phone]."} in [line["messages"][-1] for line in lines]
    assert SECRET_EMAIL not in download.text
    everything = api(gateway, "GET", f"/v1/routes/{ROUTE}/captures/content", admin_key,
                     params={"include_feedback": "all"})
    assert len(everything.text.splitlines()) == RETRAIN_AFTER - 1
    uploaded = acme.files.create(file=("captured.jsonl", download.content), purpose="fine-tune")
    outcome = ingest_in_process(gateway, uploaded.id, shared_model_cache(tmp_path_factory))
    ingest = api(gateway, "GET", f"/v1/files/{uploaded.id}/ingest", admin_key).json()
    assert (outcome, ingest["status"], ingest["status_details"]) == ("processed", "processed", None), ingest
    assert ingest["counts"]["examples"] == RETRAIN_AFTER - 2
    assert acme.files.retrieve(uploaded.id).status == "processed"

    # the exchange that reaches retrain_after starts exactly one job; the alias stays where it was
    acme.chat.completions.create(model=ROUTE, max_tokens=1, messages=[{"role": "user", "content": "Última pergunta."}])
    [job] = route_jobs(acme)
    assert job.model == SMOLLM2 and job.status == "validating_files"
    assert job.method.model_dump()["supervised"]["init_from"]["model"] == fine_tune  # its adapter is continued
    assert job.metadata == {"afina_route": ROUTE, "afina_captured": str(RETRAIN_AFTER - 1)}
    assert job.user_provided_suffix == "aeon-capture"
    training = acme.files.content(job.training_file).content
    assert training.startswith(chat_jsonl(12)) and len(training.splitlines()) == 12 + RETRAIN_AFTER - 1
    assert api(gateway, "GET", f"/v1/routes/{ROUTE}", admin_key).json()["targets"] == [
        {"model": fine_tune, "upstream": None, "weight": 1.0}]
    acme.chat.completions.create(model=ROUTE, max_tokens=1, messages=[{"role": "user", "content": "E agora?"}])
    assert len(route_jobs(acme)) == 1
    used = [item["used_in_job"] for item in captures(gateway)]
    assert used.count(job.id) == RETRAIN_AFTER and used.count(None) == 1
    unused = api(gateway, "GET", f"/v1/routes/{ROUTE}/captures/content", admin_key, params={"unused": "true"})
    assert len(unused.text.splitlines()) == 1

    # an operator retrains now on what is left; then there is nothing left
    now = api(gateway, "POST", f"/v1/routes/{ROUTE}/retrain", admin_key)
    assert now.status_code == 200, now.text
    assert now.json()["metadata"] == {"afina_route": ROUTE, "afina_captured": "1"}
    assert len(route_jobs(acme)) == 2
    again = api(gateway, "POST", f"/v1/routes/{ROUTE}/retrain", admin_key)
    assert again.status_code == 409 and again.json()["error"]["code"] == "nothing_to_retrain"

    # another tenant: every capture path answers like a missing route or completion
    globex = gateway.keys["globex"]
    for method, path, body in (("GET", f"/v1/routes/{ROUTE}/captures", None),
                               ("GET", f"/v1/routes/{ROUTE}/captures/content", None),
                               ("POST", f"/v1/routes/{ROUTE}/retrain", None),
                               ("POST", f"/v1/chat/completions/{whole.id}/feedback", {"rating": "down"})):
        theirs = api(gateway, method, path, globex, json=body)
        assert theirs.status_code == 404, (path, theirs.text)
        nobody = api(gateway, method, path.replace(ROUTE, "no-such-route").replace(whole.id, "chatcmpl-" + "f" * 24),
                     globex, json=body)
        assert theirs.json()["error"]["message"].replace(ROUTE, "?").replace(whole.id, "?") == \
            nobody.json()["error"]["message"].replace("no-such-route", "?").replace("chatcmpl-" + "f" * 24, "?")
    assert {item["completion_id"]: item for item in captures(gateway)}[whole.id]["feedback"] == "up"  # unchanged

    # scopes: reading captures and retraining need admin, feedback needs inference
    inference_only, admin_only = new_key(gateway, ["inference"]), new_key(gateway, ["admin"])
    for method, path in (("GET", f"/v1/routes/{ROUTE}/captures"), ("GET", f"/v1/routes/{ROUTE}/captures/content"),
                         ("POST", f"/v1/routes/{ROUTE}/retrain")):
        denied = api(gateway, method, path, inference_only)
        assert denied.status_code == 403 and "'admin' scope" in denied.json()["error"]["message"]
    assert api(gateway, "POST", f"/v1/chat/completions/{whole.id}/feedback", inference_only,
               json={"rating": "up"}).status_code == 200
    assert api(gateway, "POST", f"/v1/chat/completions/{whole.id}/feedback", admin_only,
               json={"rating": "up"}).status_code == 403
    assert len(captures(gateway, admin_only)) == RETRAIN_AFTER + 1


def test_routes_refuse_capture_they_cannot_honour(gateway: Gateway, fine_tune: str) -> None:
    admin_key = gateway.keys["acme"]
    theirs = gateway.client("globex").files.create(file=("t.jsonl", chat_jsonl(12)), purpose="fine-tune")
    csv = gateway.client("acme").files.create(file=("t.csv", b"prompt,completion\nhi,hello\n"), purpose="fine-tune")
    for spec, param in (({"targets": [{"model": fine_tune}], "capture": {"training_file": theirs.id}},
                         "capture.training_file"),
                        ({"targets": [{"model": fine_tune}], "capture": {"training_file": csv.id}},
                         "capture.training_file"),
                        ({"targets": [{"model": fine_tune}], "capture": {"retrain_after": 5}}, "capture.retrain_after"),
                        ({"targets": [{"model": fine_tune}], "capture": {"redact": ["rg"]}}, "capture.redact.0")):
        response = api(gateway, "PUT", "/v1/routes/capture-refused", admin_key, json=spec)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    # a route name that the capture paths would shadow
    response = api(gateway, "PUT", "/v1/routes/aeon/captures", admin_key, json={"targets": [{"model": SMOLLM2}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "name"
    # a route without capture keeps nothing, and its completions take no feedback
    plain = {"targets": [{"model": SMOLLM2}], "options": {"max_tokens": 1}}
    assert api(gateway, "PUT", "/v1/routes/no-capture", admin_key, json=plain).status_code == 200
    completion = gateway.client("acme").chat.completions.create(model="no-capture",
                                                                messages=[{"role": "user", "content": "Oi"}])
    assert api(gateway, "GET", "/v1/routes/no-capture/captures", admin_key).json()["data"] == []
    assert api(gateway, "POST", f"/v1/chat/completions/{completion.id}/feedback", admin_key,
               json={"rating": "up"}).status_code == 404
