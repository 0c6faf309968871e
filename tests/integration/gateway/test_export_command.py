"""``afina export`` against a real gateway: the re-export it queues runs in the real export stage (here, a thread of
the test playing the exporter worker), the command prints the job's events as they come and where the model was
published, and the model it registered in (the contract) Ollama answers the official ``ollama`` client; a request
the gateway refuses is an exit status of 2 with the gateway's reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import ollama
import pytest

from afina.core.artifacts import ExportManifest, FileEntry
from afina.core.artifacts.fidelity import ExportVerification
from afina.core.catalog import resolve_base_model
from afina.core.datasets.layout import adapter_prefix, model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.naming import fine_tuned_model_name
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.gateway_objects import served_artifacts
from tests.support.jobs import create_job
from tests.support.ollama_server import ContractOllama, contract_ollama  # noqa: F401

pytestmark = pytest.mark.slow  # the contract Ollama answers its smoke chat with llama.cpp
TENANT = "acme"


def exported_model(runtime: Runtime) -> tuple[str, str]:
    """A registered fine-tune whose export committed f16 and a real (SmolLM2) GGUF as its served Q4_K_M, as the
    exporter leaves one; (its name, its job id)."""
    job = create_job(runtime, TENANT, "file-test", stage="done", status="succeeded", suffix="aeon")
    prefix = model_prefix(TENANT, job.id)
    store = runtime.store
    verification = ExportVerification.build(passed=True, family="chatml", checks={}, fidelity=None)
    entries = {"f16": FileEntry.of(store.put_bytes(f"{prefix}/model-f16.gguf", b"\0" * 4096)),
               "q4_k_m": FileEntry.of(store.put_file(f"{prefix}/model-q4_k_m.gguf",
                                                     resolve_base_model(SMOLLM2).gguf_path())),
               "Modelfile": FileEntry.of(store.put_bytes(f"{prefix}/Modelfile", b"FROM ./model-q4_k_m.gguf\n")),
               "verification": FileEntry.of(store.put_bytes(f"{prefix}/verification.json", verification.to_json()))}
    name = fine_tuned_model_name(SMOLLM2, TENANT, job.suffix, job.id)
    ExportManifest.build(name=name, job_id=job.id, tenant_id=TENANT, base_model=SMOLLM2, family="chatml",
                         serve="q4_k_m", adapter=adapter_prefix(TENANT, job.id),
                         gguf={"f16": entries["f16"], "q4_k_m": entries["q4_k_m"]}, modelfile=entries["Modelfile"],
                         verification=entries["verification"], created_at=1).write(store, f"{prefix}/manifest.json")
    with runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id=TENANT, base_model=SMOLLM2, job_id=job.id,
                            artifacts=served_artifacts(TENANT, job.id, {variant: entries[variant].key
                                                                        for variant in ("f16", "q4_k_m")}))
    return name, job.id


def export_worker(runtime: Runtime, source_job_id: str, outcomes: list[str], timeout_s: float = 120) -> None:
    """The exporter worker: run the first re-export of ``source_job_id`` that the gateway queues."""
    from afina.exporter.pipeline import export_job

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with runtime.db.session() as session:
            queued = [job.id for job in session.query(Job).filter(Job.kind == "export", Job.status == "queued")
                      if (job.method or {}).get("export", {}).get("source_job_id") == source_job_id]
        if queued:
            outcomes.append(run_stage(runtime, queued[0], "export", export_job))
            return
        time.sleep(0.2)
    outcomes.append("no export was queued")


def test_afina_export_prints_the_events_and_registers_the_model_in_ollama(
        tmp_path: Path, contract_ollama: ContractOllama, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    from afina.cli.main import main

    gateway: Gateway = start_gateway(make_settings(tmp_path / "home", ollama_url=contract_ollama.url,
                                                   export_quantizations=["Q4_K_M"]))
    try:
        name, job_id = exported_model(gateway.runtime)
        monkeypatch.setenv("AFINA_BASE_URL", f"{gateway.url}/v1")
        monkeypatch.setenv("AFINA_API_KEY", gateway.keys[TENANT])
        outcomes: list[str] = []
        worker = threading.Thread(target=export_worker, args=(gateway.runtime, job_id, outcomes), daemon=True)
        worker.start()
        status = main(["--home", str(tmp_path / "cli"), "export", name, "--ollama-name", "aeon-cli"])
        worker.join(timeout=60)
        out = capsys.readouterr().out
        assert outcomes == ["done"], out
        assert status == 0, out
        lines = out.splitlines()
        assert lines[0].startswith("export ftjob-") and lines[0].endswith(f"of {name} queued")
        export_id = lines[0].split()[1]
        # the job's events, each once, in order, as the stage wrote them
        assert f"  Export of {name} queued" in lines
        assert "  Reusing the exported files listed in the model manifest" in lines
        registered = [line for line in lines if line.startswith("  Registered in Ollama as acme-aeon-cli")]
        assert len(registered) == 1 and lines.index(registered[0]) > lines.index(f"  Export of {name} queued")
        assert "ollama: registered acme-aeon-cli" in lines  # the publication the export object reports
        assert lines[-1] == f"export {export_id} succeeded"

        reply = ollama.Client(host=contract_ollama.url).chat(
            model="acme-aeon-cli", messages=[{"role": "user", "content": "oi, tudo bem?"}],
            options={"num_predict": 8, "temperature": 0})
        assert reply.message.content.strip() and reply.done

        # an unknown quantization: the gateway's 400, said on stderr, exit status 2, nothing queued
        status = main(["--home", str(tmp_path / "cli"), "export", name, "--quant", "q3_xl"])
        captured = capsys.readouterr()
        assert status == 2 and captured.out == ""
        assert captured.err.startswith("error: 400: ") and "quantizations" in captured.err
    finally:
        gateway.served.stop()
        gateway.runtime.db.dispose()
