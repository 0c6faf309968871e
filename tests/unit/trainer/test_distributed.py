"""Data-parallel training's pure parts: the batch split, the backend choice, the launch command and the ranks'
environment, the launch and outcome files, and how the worker judges a group of ranks that ended."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from afina.core.db import repository as repo
from afina.core.errors import InsufficientMemory, LeaseLost, ServiceUnavailable, TrainingFailed
from afina.core.gpu_classes import NeedsLargerGpu
from afina.core.queue.drain import WorkerDraining
from afina.core.queue.jobs import JobCancelled
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.core.training import resolve_hyperparameters
from afina.trainer.arguments import batch_arguments
from afina.trainer.distributed import (
    FollowerContext,
    Launch,
    Outcome,
    RankInfo,
    RanksCrashed,
    check_gpu_count,
    data_parallel_backend,
    judge_group,
    launch_command,
    per_rank_memory,
    rank_environment,
    read_outcomes,
    settings_payload,
    split_batch,
    write_outcome,
)
from tests.support.jobs import context_for, create_job


@pytest.mark.parametrize(("batch_size", "accumulation", "world", "expected"), [
    (4, 1, 1, (4, 1)),  # one process: as asked
    (4, 4, 2, (4, 2)),  # the accumulation divides: fewer passes, same memory a pass
    (4, 1, 2, (2, 1)),  # else the micro-batch
    (8, 3, 4, (2, 3)),
    (3, 2, 2, (3, 1)),
    (6, 2, 4, (3, 1)),  # neither divides alone: 12 examples = 4 ranks × 3 × 1
    (6, 4, 8, (3, 1)),  # 24 = 8 ranks × 3 × 1
])
def test_the_effective_batch_is_kept_across_ranks(batch_size: int, accumulation: int, world: int,
                                                  expected: tuple[int, int]) -> None:
    split = split_batch(batch_size, accumulation, world)
    assert (split.micro_batch, split.accumulation) == expected
    assert split.kept and split.effective == batch_size * accumulation
    assert "kept" in split.describe()


def test_a_batch_that_cannot_be_split_evenly_grows_by_the_least_and_says_so() -> None:
    split = split_batch(3, 1, 2)  # 3 examples over 2 ranks
    assert (split.micro_batch, split.accumulation, split.effective) == (2, 1, 4)
    assert not split.kept
    assert "cannot be split evenly" in split.describe() and "multiple of num_gpus" in split.describe()
    assert split_batch(1, 1, 4).effective == 4


def test_several_gpus_train_with_hf_and_say_so_when_auto_would_take_unsloth() -> None:
    assert data_parallel_backend("auto", "cuda", 2, unsloth_present=True)[0] == "hf"
    note = data_parallel_backend("auto", "cuda", 2, unsloth_present=True)[1]
    assert note is not None and "unsloth" in note and "hf backend" in note
    assert data_parallel_backend("auto", "cuda", 2, unsloth_present=False) == ("hf", None)
    assert data_parallel_backend("auto", "cpu", 2, unsloth_present=True) == ("hf", None)
    assert data_parallel_backend("hf", "cuda", 4, unsloth_present=True) == ("hf", None)
    # one GPU: the usual choice, Unsloth included
    assert data_parallel_backend("auto", "cuda", 1, unsloth_present=True) == ("unsloth", None)


def test_explicit_unsloth_on_several_gpus_fails_early_with_what_to_change() -> None:
    with pytest.raises(TrainingFailed, match="one GPU only.*num_gpus=2.*'hf' or 'auto'") as failure:
        data_parallel_backend("unsloth", "cuda", 2, unsloth_present=True)
    assert failure.value.param == "hyperparameters.backend"


def test_more_gpus_than_the_worker_sees_fails_naming_both_numbers() -> None:
    with pytest.raises(TrainingFailed, match="num_gpus=4 and this worker sees 2 CUDA device") as failure:
        check_gpu_count(4, "cuda", 2)
    assert failure.value.code == "not_enough_gpus"
    check_gpu_count(2, "cuda", 2)
    check_gpu_count(4, "cpu", 0)  # a CPU worker runs N gloo processes


def test_the_launch_command_is_torchrun_on_this_host_without_its_own_restarts(tmp_path: Path) -> None:
    command = launch_command(2, tmp_path / "launch.json", python="/venv/bin/python")
    assert command[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=2" in command and "--max_restarts=0" in command
    assert command[-3:] == ["-m", "afina.trainer.rank", str(tmp_path / "launch.json")]
    assert launch_command(1, tmp_path / "x")[0] == sys.executable


def test_cpu_ranks_share_the_cores_and_never_see_a_gpu() -> None:
    env = rank_environment({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}, 2, "cpu", cpu_count=8)
    assert env["OMP_NUM_THREADS"] == "4" and env["CUDA_VISIBLE_DEVICES"] == "" and env["PATH"] == "/bin"
    assert rank_environment({}, 4, "cpu", cpu_count=2)["OMP_NUM_THREADS"] == "1"
    assert rank_environment({"OMP_NUM_THREADS": "3"}, 2, "cpu", cpu_count=8)["OMP_NUM_THREADS"] == "3"
    # CUDA ranks keep the worker's devices: each picks its own by LOCAL_RANK
    cuda = rank_environment({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, "cuda", cpu_count=8)
    assert cuda["CUDA_VISIBLE_DEVICES"] == "2,3" and "OMP_NUM_THREADS" not in cuda


def test_rank_info_comes_from_torchruns_environment() -> None:
    assert RankInfo.from_env({}) == RankInfo(0, 0, 1) and not RankInfo().distributed
    rank = RankInfo.from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert rank.distributed and not rank.is_main and rank.local_rank == 1


def test_the_launch_file_rebuilds_the_workers_settings_and_is_private(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", s3_secret_key="s3cr3t-value", log_json=False, lease_s=33)
    launch = Launch(settings=settings_payload(settings, trainer_device="cpu"), job_id="ftjob-1", tenant_id="acme",
                    stage="train", owner="host:1:abc", device="cpu", outcomes_dir=str(tmp_path / "outcomes"))
    path = tmp_path / "work" / "launch.json"
    launch.write(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rebuilt = Launch.read(path)
    assert rebuilt == launch
    again = rebuilt.build_settings()
    assert again.s3_secret_key.get_secret_value() == "s3cr3t-value"
    assert (again.home, again.lease_s, again.trainer_device, again.log_json) == (tmp_path / "home", 33, "cpu", False)


def test_outcomes_carry_the_error_a_rank_ended_with(tmp_path: Path) -> None:
    failed = Outcome.of(InsufficientMemory("needs 90 GiB", needed_bytes=9.0, available_bytes=8.0))
    write_outcome(tmp_path, 0, failed)
    write_outcome(tmp_path, 1, Outcome("stopped"))
    outcomes = read_outcomes(tmp_path, 3)
    assert set(outcomes) == {0, 1}
    error = outcomes[0].error("ftjob-1")
    assert isinstance(error, InsufficientMemory) and error.message == "needs 90 GiB"
    assert (error.code, error.needed_bytes, error.available_bytes) == ("insufficient_memory", 9.0, 8.0)
    assert isinstance(Outcome.of(JobCancelled("j")).error("j"), JobCancelled)
    assert isinstance(Outcome.of(WorkerDraining("j")).error("j"), WorkerDraining)
    assert isinstance(Outcome.of(LeaseLost("j")).error("j"), LeaseLost)
    assert isinstance(Outcome.of(ServiceUnavailable("db away")).error("j"), ServiceUnavailable)
    assert Outcome.of(RuntimeError("boom")).kind == "crashed"
    larger = Outcome.of(NeedsLargerGpu("h200", "needs 100 GiB")).error("j")
    assert isinstance(larger, NeedsLargerGpu) and (larger.gpu_class, larger.message) == ("h200", "needs 100 GiB")


def test_the_worker_restarts_a_group_only_when_a_rank_died_without_a_reason() -> None:
    done, stopped = Outcome("done"), Outcome("stopped")
    crashed = Outcome("crashed", "RuntimeError: Connection closed by peer")
    assert judge_group({0: done, 1: stopped}, 2, "j").verdict == "done"
    # rank 1 SIGKILLed: rank 0's collective failed (or torchrun stopped it): start both again
    died = judge_group({0: crashed}, 2, "j")
    assert (died.verdict, died.silent_ranks) == ("died", (1,))
    assert judge_group({}, 2, "j").silent_ranks == (0, 1)
    # a reason wins over a death: rank 1 ran out of memory, rank 0 was torn down
    oom = judge_group({1: Outcome.of(TrainingFailed("CUDA ran out of memory", code="out_of_memory"))}, 2, "j")
    assert oom.verdict == "raise" and isinstance(oom.error, TrainingFailed) and oom.error.code == "out_of_memory"
    cancelled = judge_group({0: Outcome.of(JobCancelled("j")), 1: stopped}, 2, "j")
    assert isinstance(cancelled.error, JobCancelled)
    # every rank crashed on its own: a fault of the service, not restarted
    fault = judge_group({0: crashed, 1: crashed}, 2, "j")
    assert fault.verdict == "raise" and isinstance(fault.error, RanksCrashed)


def test_per_rank_gpu_memory_is_reported_in_gib_by_rank() -> None:
    gib = 1024**3
    assert per_rank_memory([[1 * gib, 2 * gib, 1.5 * gib], [0.5 * gib, 1 * gib, 0.75 * gib]]) == [
        {"rank": 0, "gpu_memory_allocated_gb": 1.0, "gpu_memory_reserved_gb": 2.0, "gpu_memory_peak_gb": 1.5},
        {"rank": 1, "gpu_memory_allocated_gb": 0.5, "gpu_memory_reserved_gb": 1.0, "gpu_memory_peak_gb": 0.75}]


def test_each_rank_gets_its_share_of_the_batch_and_the_process_groups_backend() -> None:
    config = resolve_hyperparameters({"batch_size": 4, "gradient_accumulation_steps": 3, "num_gpus": 2}, n_train=64,
                                     n_validation=0)
    one = batch_arguments(config, "cpu", 1)
    assert one == {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                   "gradient_accumulation_steps": 3}  # a single process: as before
    two = batch_arguments(config, "cpu", 2)
    assert (two["per_device_train_batch_size"], two["gradient_accumulation_steps"]) == (2, 3)
    assert (two["ddp_backend"], two["ddp_find_unused_parameters"], two["average_tokens_across_devices"]) == (
        "gloo", False, True)
    assert batch_arguments(config, "cuda", 3)["ddp_backend"] == "nccl"
    assert "average_tokens_across_devices" not in batch_arguments(config, "cuda", 2, known_fields={"x"})


def test_a_follower_reads_the_job_and_writes_nothing(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    job = create_job(runtime, "acme", "file-test", stage="train", status="queued")
    leader = context_for(runtime, job, "train")
    follower = FollowerContext(runtime=runtime, job_id=job.id, tenant_id="acme", stage="train", owner=leader.owner)
    assert follower.snapshot().id == job.id
    follower.set_status("running", message="Fine-tuning job started")
    follower.record_training_config({"batch_size": 4})
    follower.event("hello")
    follower.event_nowait("step", event_type="metrics", data={"step": 1})
    follower.close_events()
    follower.check_continue()
    with runtime.db.session() as session:
        row = repo.get_job(session, None, job.id)
        events, _ = repo.list_events(session, job.id, None, 100)
    assert (row.status, row.training_config) == ("queued", job.training_config)
    assert [event.message for event in events if event.message in ("hello", "step")] == []


class RecordingSync:
    """A ``RankSync`` without a process group: records the collective calls; another rank asks to stop at
    ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.stop_at = stop_at
        self.steps = 0

    def agree_stop(self, stop: bool) -> bool:
        self.calls.append("agree_stop")
        self.steps += 1
        return stop or self.steps == self.stop_at

    def barrier(self) -> None:
        self.calls.append("barrier")

    def gpu_memory_per_rank(self) -> list[dict[str, float]]:
        self.calls.append("gpu_memory")
        return per_rank_memory([[2.0 * 1024**3, 3.0 * 1024**3, 2.5 * 1024**3], [1024**3, 1024**3, 1024**3]])


def test_rank_0_and_a_follower_make_the_same_collective_calls_and_stop_together(tokenizer: Any, tmp_path: Path) -> None:
    """Both callbacks on the same tiny run: the same calls in the same order (a mismatch would hang a real group);
    a stop another rank asked for at step 3 stops rank 0 there with a checkpoint; the per-rank GPU memory lands in
    rank 0's step events."""
    from afina.trainer.callbacks import FollowerCallback, observe_run
    from tests.unit.trainer.test_callbacks import PAIRS, Published, encode, make_job, metrics_events, sft_trainer

    rows = [encode(tokenizer, question, answer) for question, answer in PAIRS]
    runtime, context = make_job(tmp_path)
    leader_sync, published = RecordingSync(stop_at=3), Published()
    observers = observe_run(context, published, metrics_dir=tmp_path / "work" / "metrics", hardware_interval_s=60,
                            sync=leader_sync)  # type: ignore[arg-type]
    leader = sft_trainer(tokenizer, rows, tmp_path / "rank0", observers.callback(), eval_steps=None, save_steps=2)
    leader.train()
    observers.close()
    follower_sync = RecordingSync(stop_at=3)
    follower = sft_trainer(tokenizer, rows, tmp_path / "rank1", FollowerCallback(follower_sync),  # type: ignore[arg-type]
                           eval_steps=None, save_steps=2)
    follower.train()

    assert leader.state.global_step == follower.state.global_step == 3
    assert [step for step, _, _ in published.calls] == [2, 3]  # the stop saved step 3
    assert leader_sync.calls == follower_sync.calls
    assert leader_sync.calls.count("barrier") == 2 and leader_sync.calls.count("agree_stop") == 3
    events = metrics_events(runtime, context.job_id)
    assert sorted(events) == [1, 2, 3]
    assert events[2]["gpu_memory_per_rank"][0] == {"rank": 0, "gpu_memory_allocated_gb": 2.0,
                                                   "gpu_memory_reserved_gb": 3.0, "gpu_memory_peak_gb": 2.5}


def test_the_stage_refuses_what_the_worker_cannot_run_before_starting_any_rank(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from afina.core.queue.jobs import run_stage
    from afina.trainer import recipe

    def never_launch(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no rank may start")

    monkeypatch.setattr(recipe, "train_data_parallel", never_launch)
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    unsloth = create_job(runtime, "acme", "file-test", hyperparameters={"backend": "unsloth", "num_gpus": 2},
                         stage="train", status="queued")
    assert run_stage(runtime, unsloth.id, "train", recipe.train_job) == "failed"
    with runtime.db.session() as session:
        error = repo.get_job(session, None, unsloth.id).error
    assert error["code"] == "unsupported_backend" and "one GPU only" in error["message"]

    # a CUDA worker that sees fewer devices than the job asks for
    monkeypatch.setattr(recipe.LoRAFinetuneRecipe, "_setup_device", staticmethod(lambda wanted: "cuda"))
    monkeypatch.setattr(recipe, "_visible_cuda_devices", lambda device: 1)
    four = create_job(runtime, "acme", "file-test", hyperparameters={"num_gpus": 4}, stage="train", status="queued")
    assert run_stage(runtime, four.id, "train", recipe.train_job) == "failed"
    with runtime.db.session() as session:
        error = repo.get_job(session, None, four.id).error
    assert error["code"] == "not_enough_gpus" and "num_gpus=4 and this worker sees 1 CUDA device" in error["message"]
