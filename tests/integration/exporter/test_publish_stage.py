"""The export stage publishes where the job asked: the served GGUF registered in (the contract) Ollama and
answered through the official ``ollama`` client, and the model pushed to (the local) Hub; an Ollama that is
down leaves the model succeeded and usable with the failure recorded, and a re-export retries it."""

from __future__ import annotations

from pathlib import Path

import ollama
import pytest

from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.exporter.pipeline import export_job
from tests.support.adapters import store_adapter
from tests.support.hub_server import HubServer, hub_server  # noqa: F401
from tests.support.jobs import create_job
from tests.support.ollama_server import ContractOllama, contract_ollama  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TENANT = "acme"


def model_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        [model] = [m for m in repo.list_models(session, TENANT) if m.job_id == job_id]
        return model


def test_an_export_registers_in_ollama_and_publishes_to_the_hub(
        tmp_path: Path, exporter_model_cache: Path, lora_adapter_dir: Path, contract_ollama: ContractOllama,  # noqa: F811
        hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    hub_server.state.add_user("ana")
    monkeypatch.setenv("HF_TOKEN", hub_server.state.issue_token("ana", "write"))
    runtime = Runtime(Settings(home=tmp_path / "home", model_cache_dir=exporter_model_cache, log_json=False,
                               export_quantizations=["Q8_0"], ollama_url=contract_ollama.url,
                               hub_endpoint=hub_server.url))
    job = create_job(runtime, TENANT, "file-test", stage="export", status="running", suffix="aeon")
    with runtime.db.session() as session:
        repo.get_job(session, None, job.id).export_options = {"ollama": {"name": "aeon-custom"},
                                                              "hub": {"repo": "aeon-custom"}}
    store_adapter(runtime, TENANT, job.id, lora_adapter_dir)
    assert run_stage(runtime, job.id, "export", export_job) == "done"

    model = model_row(runtime, job.id)
    assert model.ollama["status"] == "registered", model.ollama
    assert model.ollama["name"] == "acme-aeon-custom" and model.ollama["variant"] == "q8_0"
    reply = ollama.Client(host=contract_ollama.url).chat(
        model="acme-aeon-custom", messages=[{"role": "user", "content": "oi, tudo bem?"}],
        options={"num_predict": 12, "temperature": 0})
    assert reply.message.content.strip() and reply.done
    assert model.hub["status"] == "registered", model.hub
    repo_files = set(hub_server.state.repo("ana/aeon-custom").files)
    assert {"model-q8_0.gguf", "Modelfile", "README.md", "adapter/adapter_model.safetensors"} <= repo_files
    assert hub_server.state.repo("ana/aeon-custom").private


def test_an_ollama_that_is_down_fails_only_the_registration_and_a_re_export_retries(
        tmp_path: Path, exporter_model_cache: Path, lora_adapter_dir: Path,
        contract_ollama: ContractOllama) -> None:  # noqa: F811
    from afina.core import ids
    from afina.core.db.models import Job

    runtime = Runtime(Settings(home=tmp_path / "home", model_cache_dir=exporter_model_cache, log_json=False,
                               export_quantizations=["Q8_0"], ollama_url=contract_ollama.url))
    job = create_job(runtime, TENANT, "file-test", stage="export", status="running", suffix="down")
    store_adapter(runtime, TENANT, job.id, lora_adapter_dir)
    contract_ollama.go_down()
    assert run_stage(runtime, job.id, "export", export_job) == "done"
    with runtime.db.session() as session:
        assert repo.get_job(session, None, job.id).status == "succeeded"
        events = [event.message for event in repo.list_events(session, job.id, None, 100)[0]]
    model = model_row(runtime, job.id)
    assert model.ollama["status"] == "failed" and "AFINA_OLLAMA_URL" in model.ollama["error"]
    assert contract_ollama.url not in model.ollama["error"]
    assert any("Ollama registration of" in message and "failed" in message for message in events)

    contract_ollama.come_back()
    with runtime.db.session() as session:
        export = Job(id=ids.job_id(), tenant_id=TENANT, model=job.model, training_file=job.training_file, seed=1,
                     hyperparameters={}, kind="export", stage="export", status="queued",
                     method={"type": "export", "export": {"model": model.name, "source_job_id": job.id}},
                     export_options={"ollama": True})
        session.add(export)
    assert run_stage(runtime, export.id, "export", export_job) == "done"
    model = model_row(runtime, job.id)
    assert model.ollama["status"] == "registered"
    assert f"{model.ollama['name']}:latest" in contract_ollama.model_names()  # Ollama adds the default tag
