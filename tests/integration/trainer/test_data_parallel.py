"""Data-parallel training of one job (``num_gpus: 2``) on a CPU: two gloo processes under torchrun, DDP.

The comparison: one process at batch 4 against two ranks at 2 each (the same effective batch, the
same seed, so the same examples in each optimizer step, and ``lora_dropout`` 0 so no randomness
differs between the ranks). A step's loss is then the same sum over the same tokens divided by the
same count, and its gradient too (the ranks normalize by the tokens of both, DDP sums them); what
differs is the order of float additions (each rank pads its two rows to their own longest, the
all-reduce adds two partial gradients). Over four AdamW steps that stays far below 1e-3; the
tolerance is 2e-3 relative, about 1/20 of the smallest step-to-step change of this run's loss, so
a wrong batch split (another example order, or twice the effective batch) would fail it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from afina.core.artifacts.adapter import ADAPTER_MARKER, AdapterManifest
from afina.core.datasets.layout import adapter_prefix, checkpoint_prefix
from afina.core.queue.jobs import run_stage
from afina.trainer import distributed
from afina.trainer.recipe import train_job
from tests.integration.trainer.conftest import (
    RUN_HYPERPARAMETERS,
    TENANT,
    Run,
    cancel_after_step,
    checkpoint_rows,
    job_events,
    job_row,
    make_runtime,
    new_job,
    training_metrics,
)

pytestmark = pytest.mark.slow
STEPS = 4
# four steps of batch 4 from the shortest sample chats, a checkpoint every 2; no dropout (see the docstring)
HYPERPARAMETERS = {**RUN_HYPERPARAMETERS, "max_steps": STEPS, "lora_dropout": 0.0}
LOSS_TOLERANCE = 2e-3  # relative; see the module docstring


def _run(home: Path, model_cache: Path, hyperparameters: dict[str, Any]) -> Run:
    runtime = make_runtime(home, model_cache, checkpoint_keep_last=2)
    job_id = new_job(runtime, hyperparameters, validation=False)
    started = time.monotonic()
    outcome = run_stage(runtime, job_id, "train", train_job)
    return Run(runtime=runtime, job_id=job_id, outcome=outcome, seconds=time.monotonic() - started)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Run:
    """The reference, on one thread like each rank (the ranks share the cores, one thread each): on a loaded
    2-core machine two threads spinning for each other's cores made it 3× slower than both ranks together."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(tmp_path_factory.mktemp("one") / "home", model_cache, HYPERPARAMETERS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Run:
    return _run(tmp_path_factory.mktemp("ddp") / "home", model_cache, {**HYPERPARAMETERS, "num_gpus": 2})


def losses(run: Run) -> list[float]:
    metrics = training_metrics(run.runtime, run.job_id)
    return [metrics[step]["train_loss"] for step in range(1, STEPS + 1)]


def test_two_gloo_ranks_train_the_loss_curve_of_one_process(one_process: Run, two_ranks: Run) -> None:
    assert one_process.outcome == "done" and two_ranks.outcome == "done", job_row(two_ranks.runtime,
                                                                                  two_ranks.job_id).error
    runtime, job_id = two_ranks.runtime, two_ranks.job_id
    single, parallel = losses(one_process), losses(two_ranks)
    print(f"\none process {single}\ntwo ranks   {parallel}\nseconds: one {one_process.seconds:.1f}, "
          f"two {two_ranks.seconds:.1f}")
    assert parallel == pytest.approx(single, rel=LOSS_TOLERANCE)
    assert sum(single[2:]) < sum(single[:2])  # it learns, so the comparison compares something

    messages = [event.message for event in job_events(runtime, job_id)]
    assert any(m.startswith("Data-parallel training on 2 CPU processes (torchrun, DDP over gloo)") for m in messages)
    assert ("Data parallel over 2 processes: effective batch 4 kept: 2 per process × accumulation 1 × 2 processes "
            "= 4 examples an optimizer step") in messages
    # rank 0 alone writes: one metrics event a step, one row a checkpoint, one adapter
    assert sum(event.type == "metrics" for event in job_events(runtime, job_id)) == STEPS
    assert sum(m == "Fine-tuning job started" for m in messages) == 1
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [4, 2]
    for name in ("rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"):
        assert runtime.store.exists(f"{checkpoint_prefix(TENANT, job_id, 4)}/{name}"), name
    marker = AdapterManifest.read(runtime.store, f"{adapter_prefix(TENANT, job_id)}/{ADAPTER_MARKER}")
    assert marker is not None and marker.global_step == STEPS
    job = job_row(runtime, job_id)
    assert (job.status, job.stage, job.training_config["batch_size"], job.training_config["num_gpus"]) == (
        "running", "export", 4, 2)
    # both ranks' tokens, counted once: what one process trained on
    assert job.trained_tokens == job_row(one_process.runtime, one_process.job_id).trained_tokens
    assert not (runtime.settings.resolved_work_dir / job_id).exists()  # the launch file (secrets) is gone


def test_a_killed_rank_restarts_both_from_the_last_checkpoint(two_ranks: Run, model_cache: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "RANK_MODULE", "tests.integration.trainer.ddp_crash_rank")
    probe = tmp_path / "probe"
    probe.mkdir()
    monkeypatch.setenv("AFINA_TEST_DDP_DIR", str(probe))
    monkeypatch.setenv("AFINA_TEST_DDP_STEP", "2")
    runtime = make_runtime(tmp_path / "home", model_cache, checkpoint_keep_last=2)
    job_id = new_job(runtime, {**HYPERPARAMETERS, "num_gpus": 2}, validation=False)
    result: dict[str, str] = {}
    stage = threading.Thread(target=lambda: result.update(outcome=run_stage(runtime, job_id, "train", train_job)))
    stage.start()
    deadline = time.monotonic() + 240
    while not (probe / "hung").exists():  # rank 0 published step 2 and hangs; rank 1 waits in step 3
        assert stage.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.2)
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [2]
    os.kill(int((probe / "rank-1.pid").read_text()), signal.SIGKILL)
    stage.join(timeout=300)
    assert not stage.is_alive()

    assert result["outcome"] == "done", job_row(runtime, job_id).error
    messages = [event.message for event in job_events(runtime, job_id)]
    restarts = [m for m in messages if m.startswith("Training process(es) of rank")]
    assert len(restarts) == 1 and "restarting all 2 ranks from the last checkpoint (restart 1 of 2)" in restarts[0]
    assert "Resuming from checkpoint at step 2" in messages
    job = job_row(runtime, job_id)
    assert job.stage == "export" and job.error is None
    # steps 3 and 4 once each, with the uninterrupted run's losses; exactly one adapter, of step 4
    metrics = training_metrics(runtime, job_id)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert sum(event.type == "metrics" for event in job_events(runtime, job_id)) == STEPS
    uninterrupted = losses(two_ranks)
    for step in range(1, STEPS + 1):
        assert metrics[step]["train_loss"] == pytest.approx(uninterrupted[step - 1], rel=1e-3, abs=1e-3), step
    adapter = adapter_prefix(TENANT, job_id)
    marker = AdapterManifest.read(runtime.store, f"{adapter}/{ADAPTER_MARKER}")
    assert marker is not None and marker.global_step == STEPS
    marker.check_intact(runtime.store, adapter)
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [4, 2]


def test_cancelling_stops_both_ranks_at_one_checkpoint(model_cache: Path, tmp_path: Path) -> None:
    """Rank 0 sees the cancel flag; the other rank learns it through the per-step agreement, so both save the
    same step and stop (neither waits in a collective for the other)."""
    runtime = make_runtime(tmp_path / "home", model_cache)
    job_id = new_job(runtime, {**HYPERPARAMETERS, "num_gpus": 2, "max_steps": 12, "save_steps": 50},
                     validation=False)

    canceller = cancel_after_step(runtime, job_id, 1)
    assert run_stage(runtime, job_id, "train", train_job) == "cancelled"
    canceller.join()
    job = job_row(runtime, job_id)
    assert job.status == "cancelled" and job.lease_owner is None
    stopped_at = max(training_metrics(runtime, job_id))
    assert 1 <= stopped_at < 12
    assert [row.step_number for row in checkpoint_rows(runtime, job_id)] == [stopped_at]
    assert runtime.store.exists(f"{checkpoint_prefix(TENANT, job_id, stopped_at)}/rng_state_1.pth")
    messages = [event.message for event in job_events(runtime, job_id)]
    assert f"Cancellation requested: saving a checkpoint at step {stopped_at} and stopping" in messages
    assert not runtime.store.exists(f"{adapter_prefix(TENANT, job_id)}/{ADAPTER_MARKER}")
    assert not (runtime.settings.resolved_work_dir / job_id).exists()
