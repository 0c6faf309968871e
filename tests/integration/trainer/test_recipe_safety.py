"""The recipe on real SmolLM2 runs: packing, the OOM retry, the loss guard and the preflight stop bad runs early.

Out-of-memory and a NaN loss cannot be produced on purpose on a CPU worker, so those two
tests make the real Trainer raise them at its first training step (the same exception
types CUDA and a broken run raise); everything else is the real run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from afina.core.artifacts.adapter import ADAPTER_MARKER, AdapterManifest
from afina.core.datasets.layout import adapter_prefix
from afina.core.queue.jobs import run_stage
from afina.trainer.recipe import train_job
from tests.integration.trainer.conftest import (
    RUN_HYPERPARAMETERS,
    finite,
    job_events,
    job_row,
    make_runtime,
    new_job,
    training_metrics,
)

pytestmark = pytest.mark.slow


def _messages(runtime: Any, job_id: str) -> list[str]:
    return [event.message for event in job_events(runtime, job_id)]


def test_a_packed_run_trains_on_full_rows(model_cache: Path, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "packing": True, "max_seq_len": 512, "batch_size": 1,
                               "save_steps": 100, "target_modules": ["q_proj", "v_proj"]}, validation=True)
    assert run_stage(runtime, job_id, "train", train_job) == "done"
    messages = _messages(runtime, job_id)
    packed = next(message for message in messages if message.startswith("Packed 24 example(s) into "))
    rows = int(packed.split(" into ")[1].split()[0])
    assert 1 < rows < 24  # several examples share each 512-token row
    metrics = training_metrics(runtime, job_id)
    assert sorted(metrics) == list(range(1, rows + 1))  # batch 1: one packed row a step, one epoch
    assert all(finite(data["train_loss"]) for data in metrics.values())
    job = job_row(runtime, job_id)
    assert job.training_config["packing"] is True
    # the commit marker names the two modules this job's LoRA adapted, as PEFT saved them
    marker = AdapterManifest.read(runtime.store, f"{adapter_prefix(job.tenant_id, job_id)}/{ADAPTER_MARKER}")
    assert marker is not None and marker.lora.target_modules == ("q_proj", "v_proj")
    # no padding: the tokens seen in the one epoch are exactly the examples' tokens, each once
    tokenized = next(m for m in messages if m.startswith("Dataset tokenized:"))
    example_tokens = int(re.search(r"example\(s\), ([\d,]+) tokens", tokenized).group(1).replace(",", ""))
    assert job.trained_tokens == example_tokens


def out_of_memory_at_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Trainer raises CUDA's out-of-memory error at its first training step, then trains normally."""
    import torch
    from transformers import Trainer

    real_step = Trainer.training_step
    calls = {"n": 0}

    def out_of_memory_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", out_of_memory_once)


def test_cuda_out_of_memory_retries_once_with_half_the_micro_batch(model_cache: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out_of_memory_at_the_first_step(monkeypatch)
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "oom_retry": True, "max_steps": 2, "save_steps": 100},
                     validation=False)
    assert run_stage(runtime, job_id, "train", train_job) == "done"
    messages = _messages(runtime, job_id)
    assert any("retrying once with batch_size 2 and gradient_accumulation_steps 2" in m for m in messages)
    resolved = job_row(runtime, job_id).training_config
    assert (resolved["batch_size"], resolved["gradient_accumulation_steps"]) == (2, 2)
    assert sorted(training_metrics(runtime, job_id)) == [1, 2]


def test_the_throughput_plan_backs_off_once_on_out_of_memory(model_cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``speed: auto``: the plan chose the whole batch at once; CUDA runs out of memory at step 1, and the run
    rebuilds itself once with the plan's next candidate (same effective batch), says so, and finishes.

    The plan runs on CUDA workers only; here it is let plan this CPU run (the real plan, with all the RAM as its
    budget), and the real Trainer raises CUDA's out-of-memory error at its first step."""
    from afina.trainer import recipe

    monkeypatch.setattr(recipe, "PLANNED_DEVICES", ("cpu", "cuda"))
    out_of_memory_at_the_first_step(monkeypatch)
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 2, "save_steps": 100}, validation=False)
    assert run_stage(runtime, job_id, "train", train_job) == "done"
    messages = _messages(runtime, job_id)
    planned = next(m for m in messages if m.startswith("Throughput plan (speed auto): "))
    assert "micro-batch 4 × 1 accumulation, no activation checkpointing" in planned
    backed_off = [m for m in messages if "backing off once to" in m]
    assert len(backed_off) == 1
    assert backed_off[0].startswith("CUDA out of memory with micro-batch 4 × 1 accumulation")
    resolved = job_row(runtime, job_id).training_config
    assert resolved["batch_size"] * resolved["gradient_accumulation_steps"] == 4  # the effective batch kept
    assert (resolved["batch_size"], resolved["gradient_checkpointing"], resolved["checkpoint_layers"]) != (4, False,
                                                                                                           None)
    assert sorted(training_metrics(runtime, job_id)) == [1, 2]
    assert any(m.startswith("First optimizer step ") for m in messages)


def test_cuda_out_of_memory_without_retry_fails_with_advice(model_cache: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import Trainer

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 2}, validation=False)
    assert run_stage(runtime, job_id, "train", train_job) == "failed"
    job = job_row(runtime, job_id)
    assert job.status == "failed" and job.error["code"] == "out_of_memory"
    assert "set batch_size 2 and gradient_accumulation_steps 2" in job.error["message"]


def test_a_nan_loss_stops_the_job_at_that_step(model_cache: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from trl import SFTTrainer

    real_loss = SFTTrainer.compute_loss

    def nan_from_step_2(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = real_loss(self, model, inputs, *args, **kwargs)
        if self.state.global_step >= 1:
            loss = loss * torch.tensor(float("nan"))
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_from_step_2)
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 4, "save_steps": 100}, validation=False)
    assert run_stage(runtime, job_id, "train", train_job) == "failed"
    job = job_row(runtime, job_id)
    assert job.error["code"] == "loss_not_finite" and "at step 2" in job.error["message"]
    assert sorted(training_metrics(runtime, job_id))[-1] <= 2  # stopped there, not at the end


def test_preflight_refuses_a_run_the_worker_cannot_hold(model_cache: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from afina.trainer import preflight

    real_measure = preflight.Resources.measure

    def small_worker(device: str, work_dir: Path) -> preflight.Resources:
        measured = real_measure(device, work_dir)
        return preflight.Resources(gpu_free=None, gpu_total=None, ram_available=0.4 * preflight.GIB,
                                   disk_free=measured.disk_free)

    monkeypatch.setattr(preflight.Resources, "measure", staticmethod(small_worker))
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 2}, validation=False)
    assert run_stage(runtime, job_id, "train", train_job) == "failed"
    job = job_row(runtime, job_id)
    assert job.error["code"] == "insufficient_memory" and "GiB of RAM" in job.error["message"]
    assert not training_metrics(runtime, job_id)  # refused before the model was loaded or a step ran


def test_a_worker_asked_to_stop_checkpoints_and_hands_the_job_back(model_cache: Path, tmp_path: Path) -> None:
    """SIGTERM on a worker (its ``worker_shutting_down``) leaves a drain marker: the run checkpoints at the
    next step, the lease is released and the stage queued again; the next attempt resumes from there."""
    import threading
    import time

    from afina.core.queue.drain import clear_drain, request_drain
    from tests.integration.trainer.conftest import checkpoint_rows

    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 6, "save_steps": 100}, validation=False)

    def drain_after_step_2() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if max(training_metrics(runtime, job_id), default=0) >= 2:
                request_drain(runtime.settings)  # this test process plays the worker's main process
                return
            time.sleep(0.1)

    drainer = threading.Thread(target=drain_after_step_2, daemon=True)
    drainer.start()
    try:
        assert run_stage(runtime, job_id, "train", train_job) == "drained"
    finally:
        drainer.join()
        clear_drain(runtime.settings)
    job = job_row(runtime, job_id)
    assert (job.status, job.stage, job.lease_owner) == ("running", "train", None)
    stopped_at = max(training_metrics(runtime, job_id))
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [stopped_at] and stopped_at < 6
    assert any(m.startswith(f"Worker shutting down: saving a checkpoint at step {stopped_at}")
               for m in _messages(runtime, job_id))
    queued = list((runtime.settings.home / "broker").rglob("*.msg"))
    assert queued, "the train stage was not queued again"

    # the next attempt (another worker) resumes from that checkpoint and finishes
    assert run_stage(runtime, job_id, "train", train_job) == "done"
    assert f"Resuming from checkpoint at step {stopped_at}" in _messages(runtime, job_id)
    assert max(training_metrics(runtime, job_id)) == 6


def test_a_full_disk_at_a_checkpoint_fails_the_job_clearly_and_publishes_nothing(
        model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The work folder fills while the Trainer writes its first checkpoint (ENOSPC injected there: a tmpfs small
    enough to fill at that point would also stop the base model's copy first): the job fails with ``disk_full``
    and no path, and no checkpoint or adapter reaches the store or the checkpoint table."""
    import errno

    import transformers

    from tests.integration.trainer.conftest import checkpoint_rows

    def disk_full(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "work" / "checkpoint-2"))

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", disk_full)
    runtime = make_runtime(tmp_path / "home", model_cache, work_dir=tmp_path / "work")
    job_id = new_job(runtime, {**RUN_HYPERPARAMETERS, "max_steps": 4}, validation=False)
    stored_before = {info.key for info in runtime.store.list("")}
    assert run_stage(runtime, job_id, "train", train_job) == "failed"
    job = job_row(runtime, job_id)
    assert job.error["code"] == "disk_full" and "ran out of disk space" in job.error["message"]
    assert str(tmp_path) not in job.error["message"]
    # the live metrics files (what the job showed while it ran) stay; no checkpoint and no adapter was published
    added = {info.key for info in runtime.store.list("")} - stored_before
    assert not any("checkpoint" in key or key.startswith(adapter_prefix(job.tenant_id, job_id)) for key in added), added
    assert checkpoint_rows(runtime, job_id) == [] and job.fine_tuned_model is None
