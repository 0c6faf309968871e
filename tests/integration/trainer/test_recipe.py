"""The train stage end to end on SmolLM2-135M: a full run, a SIGKILLed run resumed, a cancelled run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from afina.core.artifacts.adapter import ADAPTER_MARKER, AdapterManifest
from afina.core.catalog import CATALOG
from afina.core.datasets.layout import adapter_prefix, checkpoint_prefix, job_prefix
from afina.core.db import repository as repo
from afina.core.queue.jobs import recover_stale_jobs, run_stage
from afina.trainer.recipe import train_job
from tests.integration.trainer.conftest import (
    RUN_HYPERPARAMETERS,
    TENANT,
    TRAIN_EXAMPLES,
    Run,
    cancel_after_step,
    checkpoint_rows,
    finite,
    job_events,
    job_row,
    make_runtime,
    new_job,
    runtime_update,
    training_metrics,
)
from tests.support.jobs import context_for

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[3]
SPEC = CATALOG["smollm2-135m-instruct"]
CHECKPOINT_METRIC_KEYS = {"step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                          "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy"}


def test_a_run_trains_reports_checkpoints_and_stores_the_adapter(reference_run: Run, model_cache: Path) -> None:
    runtime, job_id = reference_run.runtime, reference_run.job_id
    assert reference_run.outcome == "done"
    job = job_row(runtime, job_id)
    assert (job.status, job.stage, job.error) == ("running", "export", None)
    assert job.training_config["batch_size"] == 4 and job.training_config["n_epochs"] == 1
    assert job.hyperparameters == RUN_HYPERPARAMETERS  # the request stays as asked, stored once

    messages = [event.message for event in job_events(runtime, job_id)]
    assert "Fine-tuning job started" in messages
    assert not any(message.startswith("Resuming") for message in messages)
    metrics = training_metrics(runtime, job_id)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    for step, data in metrics.items():
        assert data["total_steps"] == 6 and finite(data["train_loss"]) and finite(data["learning_rate"])
        assert 0 <= data["train_mean_token_accuracy"] <= 1 and data["tokens_per_second"] > 0
        assert data["epoch"] == pytest.approx(step / 6, abs=1e-3)
    losses = [metrics[step]["train_loss"] for step in range(1, 7)]
    assert sum(losses[3:]) < sum(losses[:3]), losses  # it learns
    # one event a step; the evaluated step (the epoch's end) carries the validation losses in the same event
    assert [step for step, data in metrics.items() if data["full_valid_loss"] is not None] == [6]
    validation = [metrics[6]]
    assert finite(metrics[6]["full_valid_loss"]) and metrics[6]["valid_loss"] == metrics[6]["full_valid_loss"]
    assert sum(e.type == "metrics" for e in job_events(runtime, job_id)) == 6
    assert any(m.startswith("Step 6/6: training loss=") and "validation loss=" in m for m in messages)

    # checkpoints every 2 steps, the last 2 kept (rows and objects), each complete and resumable
    rows = checkpoint_rows(runtime, job_id)
    assert [row.step_number for row in rows] == [6, 4]
    assert set(rows[0].metrics) == CHECKPOINT_METRIC_KEYS and rows[0].metrics["step"] == 6
    assert rows[0].metrics["full_valid_loss"] == validation[0]["full_valid_loss"]
    assert rows[1].metrics["valid_loss"] is None and finite(rows[1].metrics["train_loss"])
    stored = {info.key for info in runtime.store.list(f"{job_prefix(TENANT, job_id)}/checkpoints/")}
    assert {key.split("/")[4] for key in stored} == {"step-0000004", "step-0000006"}
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert f"{checkpoint_prefix(TENANT, job_id, 6)}/{name}" in stored

    # the adapter: LoRA weights that moved, named after the public base, with the STOCK chat template
    adapter = adapter_prefix(TENANT, job_id)
    marker = AdapterManifest.read(runtime.store, f"{adapter}/{ADAPTER_MARKER}")
    assert marker is not None and marker.base_model == SPEC.id and marker.global_step == 6
    assert marker.trained_tokens == job.trained_tokens and marker.chat_family == SPEC.family.name
    config = json.loads(runtime.store.get_bytes(f"{adapter}/adapter_config.json"))
    assert config["base_model_name_or_path"] == SPEC.hf_repo and config["r"] == 16
    assert set(config["target_modules"]) == set(SPEC.family.target_modules) == set(marker.lora.target_modules)
    marker.check_intact(runtime.store, adapter)  # every file listed, with the sha256 of what is stored
    stored_adapter = {info.key for info in runtime.store.list(f"{adapter}/")}
    assert {entry.key for entry in marker.files} == stored_adapter - {f"{adapter}/{ADAPTER_MARKER}"}
    assert {"tokenizer.json", "chat_template.jinja"} <= set(marker.tokenizer_files)
    assert runtime.store.get_bytes(f"{adapter}/chat_template.jinja").decode() == SPEC.family.stock_template
    from safetensors.torch import load

    weights = load(runtime.store.get_bytes(f"{adapter}/adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert len(lora_b) == 30 * 7 and all(tensor.abs().sum() > 0 for tensor in lora_b)

    # report and metrics
    report = runtime.store.get_bytes(f"{job_prefix(TENANT, job_id)}/report/report.md").decode()
    assert "## Loss per step" in report and "| 6 |" in report and "batch_size | 4" in report
    records = [orjson.loads(line) for line in
               runtime.store.get_bytes(f"{job_prefix(TENANT, job_id)}/report/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["type"] == "validation"] == [6]
    # the result files, as the OpenAI API lists them: the report, its charts, the step CSV, the metrics files
    with runtime.db.session() as session:
        results = [repo.get_file(session, job.tenant_id, file_id) for file_id in job.result_files]
    assert [f.filename for f in results] == ["report.md", "report.html", "report.pdf", "chart_loss.png",
                                             "chart_learning_rate.png", "chart_memory.png", "step_metrics.csv",
                                             "training_metrics.jsonl", "hardware_metrics.jsonl"]
    assert all(f.purpose == "fine-tune-results" for f in results)
    by_name = {f.filename: f for f in results}
    assert runtime.store.get_bytes(by_name["chart_loss.png"].object_key).startswith(b"\x89PNG")
    assert b"data:image/png;base64," in runtime.store.get_bytes(by_name["report.html"].object_key)
    assert runtime.store.get_bytes(by_name["report.pdf"].object_key).startswith(b"%PDF-")
    csv_lines = runtime.store.get_bytes(by_name["step_metrics.csv"].object_key).decode().splitlines()
    assert csv_lines[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv_lines) == 7 and csv_lines[-1].split(",")[3]  # step 6 carries the validation loss

    # every non-padding token of the one epoch, counted once
    assert job.trained_tokens == epoch_tokens(model_cache)
    assert not (runtime.settings.resolved_work_dir / job_id).exists()

    # the stage is idempotent: run again (a redelivered message after the adapter was committed), it trains nothing
    started = time.monotonic()
    assert train_job(context_for(runtime, job, "train")) == "export"
    assert time.monotonic() - started < 5
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [6, 4]
    assert job_events(runtime, job_id)[-1].message.startswith("Adapter already trained by an earlier attempt")


def epoch_tokens(model_cache: Path) -> int:
    from transformers import AutoTokenizer

    from afina.core.hfmodels import base_model_dir
    from afina.trainer.data import encode_split

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir(SPEC, model_cache)))
    return encode_split(tokenizer, TRAIN_EXAMPLES, SPEC.family.training_template, 1024).tokens


def test_a_killed_run_resumes_from_its_last_checkpoint(reference_run: Run, model_cache: Path,
                                                        tmp_path: Path) -> None:
    home = tmp_path / "home"
    runtime = make_runtime(home, model_cache, checkpoint_keep_last=2)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 6})
    marker = tmp_path / "paused-after-step-4"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.trainer.crash_worker", str(home), str(model_cache), job_id,
             "4", str(marker)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert worker.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the worker never reached the step-4 checkpoint"
                time.sleep(0.2)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()

    # what a dead worker leaves: a held lease, a running job, checkpoints 2 and 4, losses up to step 4
    job = job_row(runtime, job_id)
    assert job.status == "running" and job.lease_owner is not None
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [4, 2]
    first_attempt = training_metrics(runtime, job_id)
    assert sorted(first_attempt) == [1, 2, 3, 4]

    # the lease expires; the recovery sweep requeues the stage; a worker picks it up again
    runtime_update(runtime, job_id, lease_expires_at=time.time() - 1)
    assert recover_stale_jobs(runtime) == [job_id]
    assert run_stage(runtime, job_id, "train", train_job) == "done"

    messages = [event.message for event in job_events(runtime, job_id)]
    assert "Resuming from checkpoint at step 4" in messages
    resumed = training_metrics(runtime, job_id)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 once each: the count went on from 4
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [6, 4]

    # same seed, same data, restored optimizer/scheduler/RNG: the run is the uninterrupted one
    reference = training_metrics(reference_run.runtime, reference_run.job_id)
    for step in range(1, 7):
        assert resumed[step]["train_loss"] == pytest.approx(reference[step]["train_loss"], rel=1e-3, abs=1e-3), step
        assert resumed[step]["learning_rate"] == pytest.approx(reference[step]["learning_rate"], rel=1e-6)
    job = job_row(runtime, job_id)
    assert job.stage == "export"
    assert job.trained_tokens == job_row(reference_run.runtime, reference_run.job_id).trained_tokens
    report = runtime.store.get_bytes(f"{job_prefix(TENANT, job_id)}/report/report.md").decode()
    assert "from the checkpoint at step 4" in report
    # the history survived the resume: the step metrics hold the steps before the checkpoint too
    csv_rows = runtime.store.get_bytes(f"{job_prefix(TENANT, job_id)}/report/step_metrics.csv").decode().splitlines()
    assert [int(row.split(",")[0]) for row in csv_rows[1:] if row.split(",")[0].isdigit()][:6] == [1, 2, 3, 4, 5, 6]


def test_cancelling_mid_run_saves_a_checkpoint_and_stops(model_cache: Path, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "n_epochs": 3, "save_steps": 50}, validation=False)

    canceller = cancel_after_step(runtime, job_id, 2)
    assert run_stage(runtime, job_id, "train", train_job) == "cancelled"
    canceller.join()

    job = job_row(runtime, job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.lease_owner is None
    stopped_at = max(training_metrics(runtime, job_id))
    assert 2 <= stopped_at < 18
    rows = checkpoint_rows(runtime, job_id)
    assert [row.step_number for row in rows] == [stopped_at]  # the cancellation's checkpoint, nothing else
    assert runtime.store.exists(f"{checkpoint_prefix(TENANT, job_id, stopped_at)}/adapter_model.safetensors")
    assert not runtime.store.exists(f"{adapter_prefix(TENANT, job_id)}/{ADAPTER_MARKER}")
    messages = [event.message for event in job_events(runtime, job_id)]
    assert f"Cancellation requested: saving a checkpoint at step {stopped_at} and stopping" in messages
    assert messages[-1] == "Job cancelled"
    assert not (runtime.settings.resolved_work_dir / job_id).exists()


def test_a_job_continues_from_an_earlier_jobs_adapter(reference_run: Run) -> None:
    """``model: "ft:..."``: the new run starts from the reference run's adapter, so its first loss is lower."""
    runtime = reference_run.runtime
    parent = {"model": "ft:smollm2-135m-instruct:acme:test:" + reference_run.job_id, "job_id": reference_run.job_id}
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 1, "save_steps": 100}, validation=False)
    runtime_update(runtime, job_id, method={"type": "supervised", "supervised": {"init_from": parent}})
    assert run_stage(runtime, job_id, "train", train_job) == "done"
    messages = [event.message for event in job_events(runtime, job_id)]
    assert any(m.startswith(f"Continuing from the adapter of job {reference_run.job_id}") for m in messages)
    first = training_metrics(runtime, job_id)[1]["train_loss"]
    reference_first = training_metrics(runtime, reference_run.job_id)[1]["train_loss"]
    assert first < reference_first - 0.1, (first, reference_first)

    # an adapter of another shape cannot be continued: the job says which rank to use
    mismatch = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 1, "lora_r": 8}, validation=False)
    runtime_update(runtime, mismatch, method={"type": "supervised", "supervised": {"init_from": parent}})
    assert run_stage(runtime, mismatch, "train", train_job) == "failed"
    error = job_row(runtime, mismatch).error
    assert error["code"] == "incompatible_adapter" and "lora_r to 16" in error["message"]
