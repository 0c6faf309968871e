"""End to end in multi-process mode, driven by the official openai client, on SmolLM2-135M; the model a job trains is
registered in (the contract) Ollama by the exporter and answered through the official ollama client."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import ollama
import openai
import pytest

from afina.deploy.processes import alive
from afina.deploy.runner import StackState, restart_worker
from tests.support.jobs import SAMPLE_DATASET
from tests.support.ollama_server import ContractOllama, contract_ollama  # noqa: F401
from tests.support.prometheus import PrometheusServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SMOLLM2_VOCABULARY = 49_152


def client_for(state: StackState) -> openai.OpenAI:
    return openai.OpenAI(base_url=state.base_url, api_key=state.api_key, max_retries=0, timeout=300)


def wait_for(predicate, timeout: float, what: str, state: StackState):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    logs = "\n".join(f"--- {p.name}\n{Path(p.log).read_text(errors='replace')[-2000:]}" for p in state.processes)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def upload_sample(client: openai.OpenAI, tmp_path: Path, n: int) -> str:
    path = tmp_path / "aeon.jsonl"
    path.write_bytes(b"\n".join(SAMPLE_DATASET.read_bytes().splitlines()[:n]) + b"\n")
    with open(path, "rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id


def finished(client: openai.OpenAI, job_id: str):  # noqa: ANN201
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in {"succeeded", "failed", "cancelled"} else None


def test_openai_client_drives_upload_job_events_and_chat(contract_ollama: ContractOllama,  # noqa: F811
                                                         services_stack: StackState, prometheus: PrometheusServer,
                                                         tmp_path: Path) -> None:
    client = client_for(services_stack)
    file_id = upload_sample(client, tmp_path, 24)
    job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file_id, suffix="aeon",
                                         hyperparameters={"n_epochs": 1, "batch_size": 4})
    assert job.status == "validating_files"
    job = wait_for(lambda: finished(client, job.id), 600, "the job to finish", services_stack)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:smollm2-135m-instruct:default:aeon:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    by_step = {e.data["step"]: e.data for e in events if e.type == "metrics" and "train_loss" in e.data}
    total_steps = by_step[1]["total_steps"]
    assert sorted(by_step) == list(range(1, total_steps + 1)), sorted(by_step)  # one metrics event a step
    losses = [by_step[step]["train_loss"] for step in sorted(by_step)]
    # a token cross-entropy: above 0 (there were trained tokens), below what a model that knows nothing scores
    # (ln of the vocabulary); a NaN or infinite loss, or a step with every label masked, fails this
    assert all(0 < loss < math.log(SMOLLM2_VOCABULARY) for loss in losses), losses
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].fine_tuned_model_checkpoint.startswith(job.fine_tuned_model)

    result_files = {client.files.retrieve(file_id).filename: file_id for file_id in job.result_files}
    assert {"report.md", "report.html", "step_metrics.csv", "training_metrics.jsonl",
            "hardware_metrics.jsonl", "chart_loss.png"} <= set(result_files)
    step_metrics = client.files.content(result_files["step_metrics.csv"]).text.splitlines()
    assert step_metrics[0].startswith("step,train_loss")
    csv_losses = {int(row.split(",")[0]): float(row.split(",")[1]) for row in step_metrics[1:]}
    assert csv_losses == pytest.approx(dict(zip(sorted(by_step), losses, strict=True)), rel=1e-4)
    report = client.files.content(result_files["report.md"]).text
    assert "# Training report" in report
    assert client.files.content(result_files["chart_loss.png"]).content.startswith(b"\x89PNG")
    assert_the_fidelity_figures_are_in_the_report(client, result_files, report)

    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "oi aeon, tudo bem?"}])
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=job.fine_tuned_model, max_tokens=16, temperature=0, stream=True,
        messages=[{"role": "user", "content": "what time is it?"}]) if chunk.choices)
    assert streamed.strip()
    assert_ollama_answers_the_model(client, contract_ollama, job.id, services_stack)
    assert_prometheus_saw_the_job(prometheus, services_stack)


def assert_the_fidelity_figures_are_in_the_report(client: openai.OpenAI, result_files: dict[str, str],
                                                  report: str) -> None:
    """The export's section of the job's report (a row per GGUF variant) and verification.json among its files."""
    assert report.count("## Export and fidelity") == 1, report
    section = report[report.index("## Export and fidelity"):]
    assert "| f16 | model-f16.gguf |" in section and "Fidelity gate: passed." in section
    verification = json.loads(client.files.content(result_files["verification.json"]).text)
    assert verification["passed"] is True and verification["fidelity"]["variants"]["f16"]["compared_with"] == \
        "reference"


def assert_ollama_answers_the_model(client: openai.OpenAI, server: ContractOllama, job_id: str,
                                    state: StackState) -> None:
    """The exporter registered the served GGUF in the stack's Ollama (after the job succeeded: publishing never
    holds the training up) and said so in the job's events, and the official ollama client chats with it there."""
    prefix = "Registered in Ollama as "

    def registered() -> str | None:
        messages = [event.message for event in client.fine_tuning.jobs.list_events(job_id, limit=100).data]
        failed = [message for message in messages if message.startswith("Ollama registration of")]
        assert not failed, failed
        return next((m[len(prefix):].split(";")[0] for m in messages if m.startswith(prefix)), None)

    name = wait_for(registered, 120, "the Ollama registration", state)
    assert name.startswith("default-aeon-") and f"{name}:latest" in server.model_names()
    reply = ollama.Client(host=server.url).chat(model=name, options={"num_predict": 12, "temperature": 0},
                                                messages=[{"role": "user", "content": "oi aeon, tudo bem?"}])
    assert reply.message.content.strip() and reply.done


def assert_prometheus_saw_the_job(prometheus: PrometheusServer, state: StackState) -> None:
    """Through a real Prometheus' API: every service's target is up, and the job, queue and gateway metrics
    moved since it started scraping (a series absent then counts as 0)."""
    def moved(expr: str) -> bool:
        now = prometheus.value(expr) or 0.0
        return now > (prometheus.value(expr, at=prometheus.started_at + 1) or 0.0)

    checks = {
        "a job succeeded": 'sum(afina_jobs_finished_total{status="succeeded"})',
        "ingest took a message": 'sum(afina_queue_wait_seconds_count{job="ingest", stage="ingest"})',
        "train took a message": 'sum(afina_queue_wait_seconds_count{job="trainer", stage="train"})',
        "export took a message": 'sum(afina_queue_wait_seconds_count{job="exporter", stage="export"})',
        "training steps were timed": 'sum(afina_train_step_seconds_count{job="trainer"})',
        "the gateway answered requests": 'sum(afina_http_requests_total{job="gateway"})',
        "the gateway served inference": 'sum(afina_inference_request_seconds_count{job="gateway"})',
    }
    # the last scrape may be up to a second behind the last request
    wait_for(lambda: all(moved(expr) for expr in checks.values()), 30, "Prometheus to see the job", state)
    targets = prometheus.api("targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == set(prometheus.jobs) >= {"gateway", "ingest", "trainer", "exporter"}
    assert all(t["health"] == "up" for t in targets), [(t["labels"]["job"], t["lastError"]) for t in targets]
    for job in prometheus.jobs:
        assert prometheus.value(f'up{{job="{job}"}}') == 1.0, job
    groups = prometheus.api("rules")["groups"]
    assert groups and all(rule["health"] == "ok" for group in groups for rule in group["rules"]), groups
    firing = [alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]
              if alert["state"] == "firing"]
    assert firing == [], firing


def test_sigkilled_trainer_resumes_from_checkpoint_and_registers_one_model(services_stack: StackState,
                                                                          tmp_path: Path) -> None:
    client = client_for(services_stack)
    file_id = upload_sample(client, tmp_path, 40)
    job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file_id, suffix="kill",
                                         hyperparameters={"n_epochs": 1, "batch_size": 2, "save_steps": 3})
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 600, "a first checkpoint",
             services_stack)
    trainer = services_stack.process("trainer")
    os.killpg(trainer.pid, signal.SIGKILL)
    wait_for(lambda: not alive(trainer.pid), 30, "the trainer to die", services_stack)
    killed_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    restart_worker(Path(services_stack.home), "trainer")

    job = wait_for(lambda: finished(client, job.id), 900, "the resumed job to finish", services_stack)
    assert job.status == "succeeded", job.error
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))  # all pages, oldest first
    resumed = [i for i, e in enumerate(events) if "Resuming from checkpoint" in e.message]
    assert len(resumed) == 1, [e.message for e in events]
    assert f"step {killed_at}" in events[resumed[0]].message
    # one run at a time: after the resume, steps continue from the checkpoint and strictly increase
    steps_after = [e.data["step"] for e in events[resumed[0]:] if e.type == "metrics" and "train_loss" in e.data]
    assert steps_after and steps_after[0] == killed_at + 1
    assert steps_after == sorted(set(steps_after))
    models = [m.id for m in client.models.list().data if m.id.endswith(job.id)]
    assert models == [job.fine_tuned_model]
