"""The bridge between transformers' training loop and the parts of a run the recipe owns.

``RunObservers`` holds them, one of each per job: the progress reporter (events, the training
metrics file, ETA, Prometheus), the hardware sampler, the metrics files and their uploads, the
stop watcher (cancel, drain, lost lease) and the checkpoint publisher. ``RunCallback`` is the
``TrainerCallback`` the Trainer calls; it only forwards each hook to those parts, in the order
the run needs. A retry in the same worker (after a CUDA out-of-memory error) builds a new
Trainer with a new ``RunCallback`` over the same parts, so the files, the sampler and the
attempt count simply carry on.

In a data-parallel run (``distributed.py``) rank 0 has the observers, with a ``RankSync``; the
other ranks have a ``FollowerCallback``. Both make the same collective calls at the same hooks:
the stop agreement at each step end, the barrier before a checkpoint is published, the per-rank
GPU memory at each logged training step.

Imports transformers at module import: only the recipe imports this module, inside a stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from afina.core.datasets.layout import job_prefix
from afina.core.queue.jobs import JobContext
from afina.trainer.metrics_files import UPLOAD_EVERY_S, MetricsFiles, MetricsUploader
from afina.trainer.monitor import HARDWARE_EVERY_STEPS, HARDWARE_INTERVAL_S, HardwareMonitor
from afina.trainer.progress import ProgressReporter
from afina.trainer.stopping import StopWatcher

if TYPE_CHECKING:
    from afina.trainer.distributed import RankSync

# (step, local checkpoint dir, OpenAI-shaped checkpoint metrics)
CheckpointPublisher = Callable[[int, Path, dict[str, Any]], None]


@dataclass
class RunObservers:
    """Everything that watches one job's run; ``close()`` once the run is over (safe to call twice)."""

    files: MetricsFiles
    uploads: MetricsUploader
    reporter: ProgressReporter
    sampler: HardwareMonitor
    stops: StopWatcher
    publish: CheckpointPublisher
    hardware_every_steps: int = HARDWARE_EVERY_STEPS
    sync: RankSync | None = None  # rank 0 of a data-parallel run
    closed: bool = False

    def callback(self) -> RunCallback:
        """A callback for one Trainer; every Trainer of the run gets its own, all over these parts."""
        return RunCallback(self)

    def close(self) -> None:
        """Stop the sampler (one last sample), wait for queued events and upload the files."""
        if self.closed:
            return
        self.closed = True
        self.reporter.close()
        self.sampler.stop()
        if self.files.local_dir.exists():
            self.sampler.phase = "done"
            self.sampler.record("close")
            self.uploads.now()


def observe_run(context: JobContext, publish: CheckpointPublisher, *, metrics_dir: Path,
                hardware_every_steps: int = HARDWARE_EVERY_STEPS, hardware_interval_s: float = HARDWARE_INTERVAL_S,
                upload_every_s: float = UPLOAD_EVERY_S, sync: RankSync | None = None) -> RunObservers:
    """The parts that watch ``context``'s run, its metrics files kept in ``metrics_dir`` and under the job's
    ``report/`` prefix; the sampler thread starts with the first attempt. ``sync``: this is rank 0 of a
    data-parallel run."""
    files = MetricsFiles(metrics_dir, context.runtime.store, f"{job_prefix(context.tenant_id, context.job_id)}/report")
    uploads = MetricsUploader(files, context.lease_lost, every_s=upload_every_s)
    sampler = HardwareMonitor(files.append_hardware, metrics_dir, interval_s=hardware_interval_s,
                              on_tick=uploads.if_due)
    reporter = ProgressReporter(context, files, rank_memory=sync.gpu_memory_per_rank if sync is not None else None)
    return RunObservers(files=files, uploads=uploads, reporter=reporter, sampler=sampler, stops=StopWatcher(context),
                        publish=publish, hardware_every_steps=hardware_every_steps, sync=sync)


class RunCallback(TrainerCallback):
    """Forwards the Trainer's hooks to the run's parts; holds no state of its own."""

    def __init__(self, observers: RunObservers) -> None:
        self.observers = observers

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        observers = self.observers
        # a resumed Trainer has restored its state before this hook: global_step is the checkpoint's
        attempt = observers.files.restore(state.global_step)
        observers.reporter.begin(state, attempt, model)
        observers.sampler.begin(attempt, state.global_step, float(state.epoch or 0.0))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self.observers.reporter.step_begin(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        observers = self.observers
        observers.reporter.step_end(state)
        sampler = observers.sampler
        sampler.step, sampler.epoch = state.global_step, float(state.epoch or 0.0)
        if observers.hardware_every_steps and state.global_step % observers.hardware_every_steps == 0:
            sampler.record("step")
        stop = observers.stops.should_stop(state.global_step)
        if observers.sync is not None:
            stop = observers.sync.agree_stop(stop)  # every rank stops at the same step, and saves it
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        self.observers.sampler.phase = "eval"

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.observers.sampler.phase = "train"

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.observers.reporter.log(state, logs or {}, evaluation_follows=control.should_evaluate)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        observers = self.observers
        if observers.sync is not None:
            observers.sync.barrier()  # every rank wrote its part of the checkpoint (its RNG state)
        observers.stops.ensure_owned()  # a stalled worker never publishes over its successor's checkpoints
        step = state.global_step
        observers.sampler.phase = "checkpoint"
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{step}"
        observers.publish(step, checkpoint_dir, observers.reporter.checkpoint_metrics(step))
        observers.sampler.phase = "train"
        observers.uploads.now()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        observers = self.observers
        observers.reporter.end(state)
        observers.sampler.phase = "save"
        observers.sampler.record("train_end")
        observers.uploads.now()


class FollowerCallback(TrainerCallback):
    """A rank other than 0 of a data-parallel run: it writes nothing, and joins rank 0's collective calls."""

    def __init__(self, sync: RankSync) -> None:
        self.sync = sync

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if self.sync.agree_stop(False):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if "loss" in (logs or {}):  # rank 0's reporter gathers every rank's GPU memory for this step's event
            self.sync.gpu_memory_per_rank()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        self.sync.barrier()


class EarlyStepsCallback(TrainerCallback):
    """The run's first steps: the start-up summary after step 1 and the memory check after ``check_step``.

    The throughput plan chose its micro-batch and checkpointing from an estimate; the measured
    peak of the first steps says how close the estimate was, in the job's events and report.
    """

    def __init__(self, on_first_step: Callable[[], None], on_memory_check: Callable[[int], None],
                 check_step: int = 3) -> None:
        self.on_first_step = on_first_step
        self.on_memory_check = on_memory_check
        self.check_step = check_step
        self.first_seen = False
        self.checked = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if not self.first_seen:
            self.first_seen = True
            self.on_first_step()
        if not self.checked and (state.global_step >= self.check_step or state.global_step >= state.max_steps):
            self.checked = True
            self.on_memory_check(state.global_step)
