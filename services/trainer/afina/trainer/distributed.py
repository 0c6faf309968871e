"""Data-parallel training of one job (``num_gpus`` > 1): the same recipe in N processes under torchrun, DDP.

Who does what
- The worker process that claimed the job (``run_stage``) keeps the lease and its heartbeat, and
  supervises: it checks the request against the worker (``check_gpu_count``, ``data_parallel_backend``),
  writes a launch file, starts ``python -m torch.distributed.run --standalone --nproc_per_node N -m
  afina.trainer.rank LAUNCH_FILE`` as a child, and waits for it. It trains nothing itself.
- Each rank (``afina.trainer.rank``) runs the recipe, ``LoRAFinetuneRecipe``, top to bottom; transformers'
  Trainer sees torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and wraps the LoRA model in DDP, shards the
  data per rank and averages gradients (NCCL on CUDA, a rank pinned to GPU ``LOCAL_RANK``; gloo on CPU).
- Rank 0 alone writes: events, metrics, checkpoints (store, then the row), the adapter, the report. It
  builds its own ``Runtime`` from the worker's settings (passed in the launch file, mode 0600, deleted
  after the run) and a ``JobContext`` with the worker's lease *owner string*. Every write of that
  context is fenced by the owner exactly as the worker's own are, so a lost lease stops rank 0's writes
  the same way (``LeaseLost``), and nothing has to be forwarded between processes: the recipe's code
  paths (events, checkpoint rows, result files) are the single-process ones. Forwarding events over a
  pipe was the alternative; it would need a second protocol for checkpoint rows, the adapter commit and
  the result files, all of which already know how to write fenced.
- The other ranks only train: their ``FollowerContext`` reads (job row, checkpoints) and writes nothing.
  They take part in rank 0's per-step decisions through ``RankSync`` (stop for cancel/drain, a barrier
  before a checkpoint is published, per-rank GPU memory for rank 0's step events).

Batch semantics: afina keeps the effective batch the user asked for, ``batch_size ×
gradient_accumulation_steps`` examples an optimizer step, whatever the number of ranks (``split_batch``):
with N ranks the accumulation is divided by N where it divides, else the micro-batch, else both are
refactored; when no split keeps it exactly, the per-rank micro-batch is rounded up and an event says so.
The stored ``training_config`` keeps the user's global figures; each rank applies the split when it
builds the Trainer's arguments, so a resumed attempt never splits twice.

Deaths and restarts: if any rank dies without saying why (SIGKILL, the OOM killer), torchrun tears the
group down; the worker then starts all ranks again (``MAX_RESTARTS`` times), and they resume from the
newest checkpoint through the recipe's own resume path; this is not counted as a stage attempt or a
user error. A rank that ended for a reason (``TrainingFailed``, cancellation, drain, lost lease) writes
an outcome file, and the worker raises that same error, so ``run_stage`` treats it as it always does.

On a CPU worker ``num_gpus`` means N gloo processes sharing the cores (each gets cores/N threads):
that is how this path is tested without a GPU.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from afina.core import errors
from afina.core.errors import AfinaError, LeaseLost, ServiceUnavailable, TrainingFailed
from afina.core.gpu_classes import NeedsLargerGpu
from afina.core.logging import log_event
from afina.core.queue.drain import WorkerDraining, clear_drain, drain_requested, request_drain
from afina.core.queue.jobs import JobCancelled, JobContext
from afina.core.settings import Settings
from afina.trainer.backends import BackendName, choose_backend, unsloth_installed

log = logging.getLogger("afina.trainer")

RANK_MODULE = "afina.trainer.rank"  # what torchrun runs in each process
MAX_RESTARTS = 2  # times all ranks are started again after a rank died without a reason
POLL_S = 0.5  # how often the worker looks at its lease and the drain marker while ranks train
TERMINATE_GRACE_S = 15.0  # SIGTERM to torchrun's group, then SIGKILL
LAUNCH_FILE = "launch.json"
OUTCOMES_DIR = "outcomes"
TORCHRUN_LOG = "torchrun.log"

OutcomeKind = Literal["done", "stopped", "failed", "rerouted", "cancelled", "draining", "lease_lost", "transient",
                      "crashed"]


# who this process is ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the group torchrun started; ``RankInfo()`` is a plain single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankInfo:
        env = os.environ if env is None else env
        return cls(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world_size=int(env.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# what a rank trains with ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankBatch:
    """One rank's share of the effective batch: ``micro_batch`` rows a forward pass, ``accumulation`` passes
    an optimizer step, on each of ``world_size`` ranks."""

    micro_batch: int
    accumulation: int
    world_size: int
    requested: int  # batch_size × gradient_accumulation_steps, as the config asked

    @property
    def effective(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def kept(self) -> bool:
        return self.effective == self.requested

    def describe(self) -> str:
        how = (f"{self.micro_batch} per process × accumulation {self.accumulation} × {self.world_size} processes "
               f"= {self.effective} examples an optimizer step")
        if self.kept:
            return f"effective batch {self.requested} kept: {how}"
        return (f"effective batch {self.requested} cannot be split evenly over {self.world_size} processes; "
                f"training with {how} (set batch_size × gradient_accumulation_steps to a multiple of num_gpus "
                f"to keep it)")


def split_batch(batch_size: int, accumulation: int, world_size: int) -> RankBatch:
    """The per-rank micro-batch and accumulation that keep ``batch_size × accumulation`` examples a step."""
    requested = batch_size * accumulation
    if world_size <= 1:
        return RankBatch(batch_size, accumulation, 1, requested)
    if accumulation % world_size == 0:  # fewer passes, same memory a pass
        return RankBatch(batch_size, accumulation // world_size, world_size, requested)
    if batch_size % world_size == 0:  # smaller passes, same number
        return RankBatch(batch_size // world_size, accumulation, world_size, requested)
    if requested % world_size == 0:  # e.g. 3 × 2 over 2 ranks: 3 × 1 each; the largest micro-batch that fits
        per_rank = requested // world_size
        micro = max(size for size in range(1, batch_size + 1) if per_rank % size == 0)
        return RankBatch(micro, per_rank // micro, world_size, requested)
    # no exact split: the smallest change, a micro-batch rounded up (the effective batch grows)
    return RankBatch(-(-batch_size // world_size), accumulation, world_size, requested)


def data_parallel_backend(requested: str, device: str, num_gpus: int, *,
                          unsloth_present: bool | None = None) -> tuple[BackendName, str | None]:
    """The backend ``num_gpus`` processes train with, and a note for the job's events when ``auto`` would have
    taken another one. Unsloth's open-source release trains on one GPU only."""
    if num_gpus <= 1:
        return choose_backend(requested, device, unsloth_present=unsloth_present), None
    if requested == "unsloth":
        raise TrainingFailed(f"backend 'unsloth' trains on one GPU only, and this job asks for num_gpus={num_gpus}; "
                             "set hyperparameters.backend to 'hf' or 'auto' (data-parallel with transformers + PEFT), "
                             "or num_gpus to 1", param="hyperparameters.backend", code="unsupported_backend")
    present = unsloth_installed() if unsloth_present is None else unsloth_present
    backend = choose_backend(requested, device, unsloth_present=present)
    if backend == "unsloth":  # auto on a CUDA worker with Unsloth installed
        return "hf", (f"Backend auto would take unsloth, which trains on one GPU only; training on {num_gpus} "
                      f"GPUs with the hf backend (transformers + PEFT, DDP)")
    return backend, None


def check_gpu_count(num_gpus: int, device: str, visible: int) -> None:
    """A CUDA worker must see as many devices as the job asks for (a CPU worker runs N gloo processes)."""
    if device == "cuda" and num_gpus > visible:
        raise TrainingFailed(f"this job asks for num_gpus={num_gpus} and this worker sees {visible} CUDA device(s) "
                             f"(CUDA_VISIBLE_DEVICES); set num_gpus to at most {visible}, or route the job to "
                             f"workers that own {num_gpus} GPUs", param="hyperparameters.num_gpus",
                             code="not_enough_gpus")


def ddp_backend(device: str) -> str:
    """torch.distributed's backend for ``device``: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def launch_command(num_processes: int, launch_file: Path, *, python: str = sys.executable,
                   module: str = RANK_MODULE) -> list[str]:
    """torchrun on this host: ``num_processes`` ranks, a local rendezvous, no restarts of its own (the
    worker restarts the group itself, and only after a death without a reason)."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            "--max_restarts=0", "--monitor_interval=0.5", "-m", module, str(launch_file)]


def rank_environment(base: Mapping[str, str], num_processes: int, device: str, cpu_count: int) -> dict[str, str]:
    """The environment torchrun hands every rank (it adds RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*).

    On CPU the ranks share the cores: each gets ``cpu_count // N`` threads unless the operator set
    ``OMP_NUM_THREADS`` (torchrun would otherwise force 1). On CUDA a rank picks its GPU by LOCAL_RANK
    among the worker's ``CUDA_VISIBLE_DEVICES``, kept as they are.
    """
    env = dict(base)
    if device != "cuda":
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count // num_processes)))
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU: no rank touches a GPU
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer ends a collective instead of hanging it
    env["PYTHONUNBUFFERED"] = "1"
    return env


# the launch file and the outcome files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """What every rank needs to rebuild the worker's view: its settings, the job, the lease owner."""

    settings: dict[str, Any]
    job_id: str
    tenant_id: str
    stage: str
    owner: str
    device: str
    outcomes_dir: str

    def write(self, path: Path) -> None:
        """Mode 0600: the settings carry the database URL and the store's keys."""
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(self), handle)

    @classmethod
    def read(cls, path: Path) -> Launch:
        return cls(**json.loads(path.read_text()))

    def build_settings(self) -> Settings:
        return Settings(**self.settings)


def settings_payload(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """``settings`` as JSON-able values that rebuild the same ``Settings`` (secrets revealed: the launch file
    is private to the worker's user)."""
    payload = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            payload[name] = value.get_secret_value()
    payload.update(overrides)
    return payload


@dataclass(frozen=True)
class Outcome:
    """How one rank ended; written by the rank, read by the worker."""

    kind: OutcomeKind
    message: str = ""
    error_class: str | None = None  # an ``afina.core.errors`` class name, for ``failed``
    code: str | None = None
    param: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: BaseException) -> Outcome:
        """The outcome a rank's exception stands for."""
        from afina.core.transient import is_transient

        if isinstance(exc, LeaseLost):
            return cls("lease_lost", str(exc))
        if isinstance(exc, NeedsLargerGpu):
            return cls("rerouted", exc.message, extra={"gpu_class": exc.gpu_class})
        if isinstance(exc, JobCancelled):
            return cls("cancelled", str(exc))
        if isinstance(exc, WorkerDraining):
            return cls("draining", str(exc))
        if isinstance(exc, AfinaError) and not is_transient(exc):
            extra = {name: getattr(exc, name) for name in ("needed_bytes", "available_bytes") if hasattr(exc, name)}
            return cls("failed", exc.message, error_class=type(exc).__name__, code=exc.code, param=exc.param,
                       extra=extra)
        if is_transient(exc):
            return cls("transient", f"{type(exc).__name__}: {exc}")
        return cls("crashed", f"{type(exc).__name__}: {exc}")

    @property
    def final(self) -> bool:
        """An ending the worker must act on (not a rank torn down after another one failed)."""
        return self.kind in ("failed", "rerouted", "cancelled", "draining", "lease_lost", "transient")

    def error(self, job_id: str) -> BaseException:
        """The exception ``run_stage`` gets for this outcome."""
        if self.kind == "lease_lost":
            return LeaseLost(job_id)
        if self.kind == "cancelled":
            return JobCancelled(job_id)
        if self.kind == "rerouted":
            return NeedsLargerGpu(str(self.extra["gpu_class"]), self.message)
        if self.kind == "draining":
            return WorkerDraining(job_id)
        if self.kind == "transient":
            return ServiceUnavailable(f"a training process lost a service it depends on ({self.message})")
        if self.kind == "failed":
            cls = getattr(errors, self.error_class or "", None)
            if not (isinstance(cls, type) and issubclass(cls, AfinaError)):
                cls = TrainingFailed
            exc = cls.__new__(cls)
            AfinaError.__init__(exc, self.message, param=self.param, code=self.code)
            for name, value in self.extra.items():
                setattr(exc, name, value)
            return exc
        return RanksCrashed(self.message)


class RanksCrashed(Exception):
    """Every rank ended with an unexpected error (a fault of the service): ``run_stage`` reports an error id."""


def write_outcome(outcomes_dir: Path, rank: int, outcome: Outcome) -> None:
    outcomes_dir.mkdir(parents=True, exist_ok=True)
    partial = outcomes_dir / f"rank-{rank}.json.partial"
    partial.write_text(json.dumps(asdict(outcome)))
    partial.rename(outcomes_dir / f"rank-{rank}.json")


def read_outcomes(outcomes_dir: Path, world_size: int) -> dict[int, Outcome]:
    """The outcome of each rank that wrote one (a rank killed by a signal wrote none)."""
    found = {}
    for rank in range(world_size):
        path = outcomes_dir / f"rank-{rank}.json"
        if path.is_file():
            found[rank] = Outcome(**json.loads(path.read_text()))
    return found


@dataclass(frozen=True)
class GroupResult:
    """What one launch of the group came to: ``done``, ``raise`` (``error``), or ``died`` (restart)."""

    verdict: Literal["done", "raise", "died"]
    error: BaseException | None = None
    silent_ranks: tuple[int, ...] = ()


def judge_group(outcomes: Mapping[int, Outcome], world_size: int, job_id: str) -> GroupResult:
    """Decide from the ranks' outcomes: rank 0 done wins; then a reason any rank gave (rank 0's first); a rank
    that left no outcome means it was killed, and the group is started again; every rank crashing is a fault."""
    if outcomes.get(0, Outcome("crashed")).kind == "done":
        return GroupResult("done")
    for rank in sorted(outcomes):
        if outcomes[rank].final:
            return GroupResult("raise", outcomes[rank].error(job_id))
    silent = tuple(rank for rank in range(world_size) if rank not in outcomes)
    if silent:
        return GroupResult("died", silent_ranks=silent)
    crashed = [f"rank {rank}: {outcome.message}" for rank, outcome in sorted(outcomes.items())
               if outcome.kind == "crashed"]
    return GroupResult("raise", RanksCrashed("; ".join(crashed) or "the training processes stopped early"))


# the worker's side ----------------------------------------------------------------------------------------------


def train_data_parallel(context: JobContext, *, num_gpus: int, device: str, work_dir: Path,
                        adapter_committed: Callable[[], bool], max_restarts: int | None = None) -> None:
    """Train ``context``'s job on ``num_gpus`` ranks; returns once rank 0 committed the adapter and the report
    (or a killed group had committed the adapter already), raises what a rank ended with otherwise
    (``TrainingFailed`` after ``max_restarts`` restarts)."""
    restarts_allowed = MAX_RESTARTS if max_restarts is None else max_restarts
    settings = context.runtime.settings
    shutil.rmtree(work_dir, ignore_errors=True)  # a dead attempt's files; the store has what counts
    work_dir.mkdir(parents=True)
    launch_file = work_dir / LAUNCH_FILE
    outcomes_dir = work_dir / OUTCOMES_DIR
    Launch(settings=settings_payload(settings, trainer_device=device), job_id=context.job_id,
           tenant_id=context.tenant_id, stage=context.stage, owner=context.owner, device=device,
           outcomes_dir=str(outcomes_dir)).write(launch_file)
    command = launch_command(num_gpus, launch_file, module=RANK_MODULE)
    env = rank_environment(os.environ, num_gpus, device, os.cpu_count() or 1)
    where = f"{num_gpus} GPUs" if device == "cuda" else f"{num_gpus} CPU processes"
    context.event(f"Data-parallel training on {where} (torchrun, DDP over {ddp_backend(device)}); rank 0 writes "
                  f"the events, checkpoints and adapter")
    try:
        for launch_number in range(restarts_allowed + 1):
            shutil.rmtree(outcomes_dir, ignore_errors=True)
            outcomes_dir.mkdir()
            returncode = _run_group(context, command, env, work_dir)
            result = judge_group(read_outcomes(outcomes_dir, num_gpus), num_gpus, context.job_id)
            log_event(log, "train.ranks_ended", job_id=context.job_id, returncode=returncode, verdict=result.verdict,
                      silent_ranks=list(result.silent_ranks), log_tail=_tail(work_dir / TORCHRUN_LOG))
            if result.verdict == "done":
                return
            if result.verdict == "raise":
                assert result.error is not None
                raise result.error
            ranks = ", ".join(str(rank) for rank in result.silent_ranks)
            if adapter_committed():  # killed after the commit (writing the report): as a new attempt would, move on
                context.event("Adapter already trained before the training processes stopped; moving on to export")
                return
            if launch_number == restarts_allowed:
                break
            context.event(f"Training process(es) of rank {ranks} stopped without finishing (killed, or out of "
                          f"memory); restarting all {num_gpus} ranks from the last checkpoint "
                          f"(restart {launch_number + 1} of {restarts_allowed})", level="warn")
        raise TrainingFailed(f"the training processes of this {num_gpus}-process job were killed "
                             f"{restarts_allowed + 1} times before finishing (the last time rank {ranks}; out of "
                             f"memory, or a node problem); giving up. Fewer num_gpus, a smaller batch_size or "
                             f"max_seq_len use less memory a process", code="ranks_lost")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # the launch file holds secrets


def _run_group(context: JobContext, command: list[str], env: dict[str, str], work_dir: Path) -> int:
    """Run torchrun to its end; while it runs, a lost lease ends it (``LeaseLost``) and a drain of this worker is
    passed on to rank 0 (whose parent is torchrun: it reads the drain marker of its parent's PID)."""
    settings = context.runtime.settings
    with open(work_dir / TORCHRUN_LOG, "ab") as output:
        group = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, preexec_fn=_die_with_parent)
    drained = False
    try:
        while group.poll() is None:
            time.sleep(POLL_S)
            if context.lease_lost.is_set():
                _terminate(group)
                raise LeaseLost(context.job_id)
            if not drained and drain_requested(settings):
                drained = True
                request_drain(settings, group.pid)
        return group.returncode
    except BaseException:
        _terminate(group)  # a soft time limit, a lost lease: no rank outlives the stage
        raise
    finally:
        clear_drain(settings, group.pid)


def _terminate(group: subprocess.Popen[bytes]) -> None:
    """SIGTERM to torchrun and its ranks (their own session), SIGKILL after a grace period."""
    if group.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:
            return
        try:
            group.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:
    """In the child before exec: torchrun gets SIGTERM if the worker dies (Linux), and stops its ranks."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return ""


# the ranks' side ------------------------------------------------------------------------------------------------


class FollowerContext(JobContext):
    """The context of a rank other than 0: reads the job like rank 0, writes nothing (rank 0 writes for all).

    Stopping is rank 0's decision, shared at every step through ``RankSync.agree_stop``.
    """

    def write(self, change: Callable[..., Any], what: str = "job write") -> Any:
        return None

    def event(self, message: str, *, level: str = "info", event_type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        return None

    def event_nowait(self, message: str, *, level: str = "info", event_type: str = "message",
                     data: dict[str, Any] | None = None) -> None:
        return None

    def check_continue(self) -> None:
        return None


GIB = 1024**3


class RankSync:
    """The collective calls that keep the ranks in step; every rank makes the same calls in the same order.

    ``agree_stop`` at each step end, ``barrier`` before a checkpoint is published, ``gpu_memory_per_rank``
    at each logged step (a collective only on CUDA), ``min_over_ranks`` once when ``speed: auto`` plans.
    """

    def __init__(self, rank: RankInfo, device: str) -> None:
        self.rank = rank
        self.device = device

    def _tensor(self, values: list[float]) -> Any:
        import torch

        where = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=where)

    def agree_stop(self, stop: bool) -> bool:
        """True on every rank when any rank must stop (rank 0 decides: cancel, drain)."""
        import torch.distributed as dist

        flag = self._tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def min_over_ranks(self, value: float) -> float:
        import torch.distributed as dist

        figure = self._tensor([value])
        dist.all_reduce(figure, op=dist.ReduceOp.MIN)
        return float(figure.item())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gpu_memory_per_rank(self) -> list[dict[str, float]]:
        """Each rank's allocated, reserved and peak GPU memory (GiB), gathered on every rank; [] off CUDA."""
        if self.device != "cuda":
            return []
        import torch
        import torch.distributed as dist

        index = torch.cuda.current_device()
        local = self._tensor([float(torch.cuda.memory_allocated(index)), float(torch.cuda.memory_reserved(index)),
                              float(torch.cuda.max_memory_allocated(index))])
        gathered = [torch.zeros_like(local) for _ in range(self.rank.world_size)]
        dist.all_gather(gathered, local)
        return per_rank_memory([tensor.tolist() for tensor in gathered])


def per_rank_memory(figures: list[list[float]]) -> list[dict[str, float]]:
    """``[[allocated, reserved, peak] bytes, ...]`` by rank, as a step event's ``gpu_memory_per_rank``."""
    return [{"rank": rank, "gpu_memory_allocated_gb": round(allocated / GIB, 3),
             "gpu_memory_reserved_gb": round(reserved / GIB, 3), "gpu_memory_peak_gb": round(peak / GIB, 3)}
            for rank, (allocated, reserved, peak) in enumerate(figures)]
