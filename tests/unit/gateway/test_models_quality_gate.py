"""``GET /v1/models/{id}``: a fine-tune carries its quality gate as afina's extension field, and the blocking
verdict serving checks; base models and the list keep OpenAI's exact shape."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.core.artifacts.evaluation import GateCheck, QualityGate, refuse_blocked
from afina.core.db import repository as repo
from afina.core.db.models import Model
from afina.core.errors import ModelBlocked
from afina.core.quality_gate import GateRules
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.app import create_app

NAME = "ft:smollm2-135m-instruct:acme:x:ftjob-1"


def gate(passed: bool, enforced: bool) -> QualityGate:
    check = GateCheck(rule="variant_within_tolerance", model="gguf:q4_k_m", against="gguf:f16", metric="token_f1",
                      value=0.2, reference=0.5, limit=0.05, passed=passed, message="Q4_K_M GGUF token_f1 0.2 vs 0.5")
    return QualityGate(passed=passed, enforced=enforced, main_metric="token_f1", rules=GateRules(enforce=enforced),
                       checks=[check], evaluation="jobs/acme/ftjob-1/evaluation/evaluation.json", evaluated_at=1)


@pytest.fixture
def stack(tmp_path: Path) -> tuple[TestClient, Runtime, str]:
    runtime = Runtime(Settings(home=tmp_path, log_json=False))
    with runtime.db.session() as session:
        key = repo.create_api_key(session, "acme")
        repo.register_model(session, name=NAME, tenant_id="acme", base_model="smollm2-135m-instruct",
                            job_id="ftjob-1", artifacts={})
    return TestClient(create_app(runtime)), runtime, key


def set_gate(runtime: Runtime, value: QualityGate | None) -> None:
    with runtime.db.session() as session:
        session.get(Model, NAME).quality_gate = value.model_dump(mode="json") if value else None  # type: ignore[union-attr]


def test_an_unevaluated_fine_tune_says_so_and_a_base_model_has_no_extension(stack) -> None:  # noqa: ANN001
    client, _runtime, key = stack
    headers = {"Authorization": f"Bearer {key}"}
    body = client.get(f"/v1/models/{NAME}", headers=headers).json()
    assert body["afina"] == {"quality_gate": None, "blocked": False}
    assert set(client.get("/v1/models/smollm2-135m-instruct", headers=headers).json()) == {
        "id", "object", "created", "owned_by"}
    listed = client.get("/v1/models", headers=headers).json()["data"]
    assert all("afina" not in model for model in listed)


def test_the_gate_is_shown_with_every_check_and_an_enforced_failure_is_blocked(stack) -> None:  # noqa: ANN001
    client, runtime, key = stack
    set_gate(runtime, gate(passed=False, enforced=True))
    body = client.get(f"/v1/models/{NAME}", headers={"Authorization": f"Bearer {key}"}).json()
    assert body["afina"]["blocked"] is True
    assert body["afina"]["quality_gate"]["checks"][0]["value"] == 0.2
    assert QualityGate.model_validate(body["afina"]["quality_gate"]) == gate(passed=False, enforced=True)
    set_gate(runtime, gate(passed=False, enforced=False))
    assert client.get(f"/v1/models/{NAME}", headers={"Authorization": f"Bearer {key}"}).json()["afina"][
        "blocked"] is False


def test_refuse_blocked_only_refuses_an_enforced_failure() -> None:
    refuse_blocked(NAME, None)
    refuse_blocked(NAME, gate(passed=True, enforced=True).model_dump(mode="json"))
    refuse_blocked(NAME, gate(passed=False, enforced=False).model_dump(mode="json"))
    with pytest.raises(ModelBlocked, match="failed its quality gate.*Q4_K_M GGUF token_f1 0.2 vs 0.5") as caught:
        refuse_blocked(NAME, gate(passed=False, enforced=True).model_dump(mode="json"))
    assert caught.value.http_status == 409 and caught.value.code == "model_blocked_by_quality_gate"


def test_chat_with_a_model_its_enforced_gate_blocks_is_refused_before_loading(stack) -> None:  # noqa: ANN001
    """The serving path checks the gate: 409 naming the failed check (no GGUF is fetched, none is registered
    here); once the gate passes, the same request goes on to loading the model (and finds no servable GGUF)."""
    client, runtime, key = stack
    headers = {"Authorization": f"Bearer {key}"}
    request = {"model": NAME, "messages": [{"role": "user", "content": "oi"}]}
    set_gate(runtime, gate(passed=False, enforced=True))
    blocked = client.post("/v1/chat/completions", headers=headers, json=request)
    assert blocked.status_code == 409
    assert blocked.json()["error"]["code"] == "model_blocked_by_quality_gate"
    assert "Q4_K_M GGUF token_f1 0.2 vs 0.5" in blocked.json()["error"]["message"]
    set_gate(runtime, gate(passed=True, enforced=True))
    served = client.post("/v1/chat/completions", headers=headers, json=request)
    assert served.status_code != 409
