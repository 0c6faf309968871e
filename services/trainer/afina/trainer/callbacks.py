"""The bridge between transformers' training loop and the job: events, metrics, files, checkpoints, stopping.

Backend-blind: it reads only what every ``transformers.Trainer`` hands its callbacks (the
state, the logs, the model), so the hf and Unsloth backends (both TRL ``SFTTrainer``s) report
the same way. Imports transformers at module import: only the recipe imports this module, and
only inside a running stage.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from afina.core.datasets.layout import job_prefix
from afina.core.metrics import TRAIN_LOSS, TRAIN_STEP_SECONDS, TRAIN_TOKENS_PER_SECOND
from afina.core.queue.drain import WorkerDraining
from afina.core.queue.jobs import JobCancelled, JobContext, LeaseLost
from afina.trainer.accuracy import TokenAccuracyMeter
from afina.trainer.metrics_files import TRAINING_METRICS_FILE, MetricsFiles
from afina.trainer.monitor import (
    HARDWARE_EVERY_STEPS,
    HARDWARE_INTERVAL_S,
    HardwareMonitor,
    current_gpu_memory,
    reset_gpu_peaks,
)

log = logging.getLogger("afina.trainer")

CHECKPOINT_METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                          "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")
ESTIMATE_EVERY_S = 5.0
UPLOAD_EVERY_S = 60.0
LOSS_AVERAGE_WINDOW = 10  # logged steps in ``train_loss_avg_10``
ETA_WINDOW = 20  # recent steps whose mean time predicts the rest

# (step, local checkpoint dir, OpenAI-shaped checkpoint metrics)
CheckpointPublisher = Callable[[int, Path, dict[str, Any]], None]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class JobProgressCallback(TrainerCallback):
    """Reports every step to the job and stops the loop when the job must stop.

    - each logged step becomes one OpenAI ``metrics`` event ("Step 3/20: training loss=1.2300")
      with step, total_steps, train/valid losses, token accuracies, learning rate, tokens/s
      (non-padding), epoch, elapsed and remaining seconds, and GPU memory on CUDA; a step that
      is also evaluated (on the whole validation split) carries ``valid_*`` and ``full_valid_*``
      in the same event, null elsewhere;
    - each logged step is also a line of ``training_metrics.jsonl`` (with a moving average of the
      loss, grad norm and progress), and the hardware is sampled every ``hardware_every_steps``
      steps and every ``hardware_interval_s`` seconds into ``hardware_metrics.jsonl``; both are
      copied to ``jobs/<id>/report/`` at every checkpoint and every ``upload_every_s`` seconds;
    - the worker's Prometheus metrics follow the run (step time, tokens/s, loss, GPU memory);
    - at every step end the job is checked: a cancellation saves a checkpoint and stops
      the loop (the recipe then raises ``JobCancelled``); a lost lease raises ``LeaseLost``
      at once, saving nothing, since another worker owns the job now;
    - every checkpoint the Trainer writes is handed to ``publish`` (upload, row, prune).

    The recipe calls ``close()`` once the run is over (it stops the sampler and uploads the
    files a last time); ``files`` holds what the report is built from. A new callback on the
    same ``metrics_dir`` (a retry after an out-of-memory error) closes the one it replaces and
    continues its files as the next attempt.
    """

    _live: weakref.WeakValueDictionary[Path, JobProgressCallback] = weakref.WeakValueDictionary()

    def __init__(self, context: JobContext, publish: CheckpointPublisher, *, metrics_dir: Path,
                 hardware_every_steps: int = HARDWARE_EVERY_STEPS, hardware_interval_s: float = HARDWARE_INTERVAL_S,
                 upload_every_s: float = UPLOAD_EVERY_S) -> None:
        self.context = context
        self.publish = publish
        self.cancelled = False
        self.draining = False  # the worker is shutting down (SIGTERM): checkpoint, stop, hand the job back
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.tokens_per_second: float | None = None
        self.step_seconds: list[float] = []
        self.attempt = 1
        self.resumed_from_step = 0
        self.files = MetricsFiles(metrics_dir, context.runtime.store,
                                  f"{job_prefix(context.tenant_id, context.job_id)}/report")
        self.monitor = HardwareMonitor(self.files.append_hardware, metrics_dir, interval_s=hardware_interval_s,
                                       on_tick=self._upload_if_due)
        self.accuracy = TokenAccuracyMeter()
        self.hardware_every_steps = hardware_every_steps
        self.upload_every_s = upload_every_s
        self._train_started = time.monotonic()
        self._step_started = 0.0
        self._tokens_at_step_start = 0
        self._interval_tokens = 0
        self._interval_seconds = 0.0
        self._last_estimate = 0.0
        self._last_upload = time.monotonic()
        self._recent_losses: deque[float] = deque(maxlen=LOSS_AVERAGE_WINDOW)
        self._pending: dict[str, Any] | None = None  # a step's metrics waiting for its evaluation
        self._closed = False
        replaced = JobProgressCallback._live.get(metrics_dir.resolve())
        if replaced is not None:
            replaced.close()
        JobProgressCallback._live[metrics_dir.resolve()] = self

    # lifecycle -------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        # a resumed Trainer has restored its state before this hook: global_step is the checkpoint's
        self.resumed_from_step = state.global_step
        self.attempt = self.files.restore(state.global_step)
        for record in self.files.records(TRAINING_METRICS_FILE):
            if record.get("train_loss") is not None:
                self._recent_losses.append(record["train_loss"])
        self._train_started = time.monotonic()
        reset_gpu_peaks()
        self.monitor.attempt, self.monitor.step = self.attempt, state.global_step
        self.monitor.epoch, self.monitor.phase = float(state.epoch or 0.0), "train"
        if not self.monitor.running:
            self.monitor.start()
        self._sample("train_begin")
        if model is not None and not self.accuracy.attached:
            self.accuracy.attach(model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._emit_pending(state)
        self.accuracy.detach()
        self.monitor.phase = "save"
        self._sample("train_end")
        self._upload()

    def close(self) -> None:
        """Stop the sampler (one last sample), upload the files and wait for queued events; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.accuracy.detach()
        self.monitor.stop()
        self.context.flush_events()  # the last step's metrics event is written before anyone reads the job
        if self.files.local_dir.exists():
            self.monitor.phase = "done"
            self._sample("close")
            self._upload()

    # timing ----------------------------------------------------------------

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._step_started = time.monotonic()
        self._tokens_at_step_start = state.num_input_tokens_seen

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        # the optimizer step: its micro-batches' forward and backward passes and the update (not data
        # loading, evaluation or checkpointing, which happen outside these two hooks)
        seconds = time.monotonic() - self._step_started
        self.step_seconds.append(seconds)
        TRAIN_STEP_SECONDS.observe(seconds)
        self._interval_tokens += state.num_input_tokens_seen - self._tokens_at_step_start
        self._interval_seconds += seconds
        self.monitor.step, self.monitor.epoch = state.global_step, float(state.epoch or 0.0)
        if self.hardware_every_steps and state.global_step % self.hardware_every_steps == 0:
            self._sample("step")
        try:
            self.context.check_continue()
        except JobCancelled:
            self.cancelled = True
            control.should_save = True
            control.should_training_stop = True
            self.context.event(f"Cancellation requested: saving a checkpoint at step {state.global_step} "
                               f"and stopping", level="warn")
        except WorkerDraining:
            self.draining = True
            control.should_save = True
            control.should_training_stop = True
            self.context.event(f"Worker shutting down: saving a checkpoint at step {state.global_step}; "
                               f"the job resumes from it on another worker", level="warn")
        return control

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        self.monitor.phase = "eval"

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.monitor.phase = "train"

    # reporting -------------------------------------------------------------

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            self._emit_pending(state)  # a step whose announced evaluation never logged
            self._log_training(state, logs, control)
        elif "eval_loss" in logs:
            valid_loss = _finite(logs["eval_loss"])
            accuracy = _finite(logs.get("eval_mean_token_accuracy"))
            if accuracy is None:
                accuracy = _rounded(self.accuracy.take("eval"), 6)
            self.last_eval = {"step": step, "valid_loss": valid_loss, "valid_mean_token_accuracy": accuracy,
                              "full_valid_loss": valid_loss, "full_valid_mean_token_accuracy": accuracy}
            if self._pending is None or self._pending["step"] != step:
                self._pending = {"step": step, "total_steps": state.max_steps,
                                 "epoch": round(float(state.epoch or 0.0), 4)}
            self._pending.update({key: value for key, value in self.last_eval.items() if key != "step"})
            self.files.append_training({"type": "validation", "timestamp": round(time.time(), 3), "step": step,
                                        "epoch": round(float(state.epoch or 0.0), 4), "attempt": self.attempt,
                                        **{k: v for k, v in self.last_eval.items() if k != "step"}})
            self._emit_pending(state)

    def _log_training(self, state: TrainerState, logs: dict[str, Any], control: TrainerControl) -> None:
        step = state.global_step
        loss = _finite(logs["loss"])
        accuracy = _finite(logs.get("mean_token_accuracy"))
        measured = self.accuracy.take("train")
        if accuracy is not None and self.accuracy.attached:
            self.accuracy.detach()  # the backend reports it: stop measuring twice
        elif accuracy is None:
            accuracy = _rounded(measured, 6)
        if self._interval_seconds > 0:
            self.tokens_per_second = self._interval_tokens / self._interval_seconds
            TRAIN_TOKENS_PER_SECOND.set(self.tokens_per_second)
        self._interval_tokens, self._interval_seconds = 0, 0.0
        if loss is not None:
            TRAIN_LOSS.set(loss)
            self._recent_losses.append(loss)
        self.last_train = {"step": step, "train_loss": loss, "train_mean_token_accuracy": accuracy}
        elapsed = time.monotonic() - self._train_started
        eta = self._eta_seconds(state)
        epoch = round(float(state.epoch or 0.0), 4)
        tokens_per_second = round(self.tokens_per_second, 1) if self.tokens_per_second else None
        self._pending = {
            "step": step, "total_steps": state.max_steps,
            "train_loss": loss, "train_mean_token_accuracy": accuracy,
            "valid_loss": None, "valid_mean_token_accuracy": None,
            "full_valid_loss": None, "full_valid_mean_token_accuracy": None,
            "learning_rate": _finite(logs.get("learning_rate")),
            "tokens_per_second": tokens_per_second, "epoch": epoch,
            "elapsed_s": round(elapsed, 1), "eta_s": _rounded(eta, 1),
            **self._gpu_memory(),
        }
        average = sum(self._recent_losses) / len(self._recent_losses) if self._recent_losses else None
        self.files.append_training({
            "type": "train", "timestamp": round(time.time(), 3), "step": step, "total_steps": state.max_steps,
            "epoch": epoch, "attempt": self.attempt, "train_loss": loss,
            f"train_loss_avg_{LOSS_AVERAGE_WINDOW}": _rounded(average, 6), "train_mean_token_accuracy": accuracy,
            "learning_rate": self._pending["learning_rate"], "grad_norm": _finite(logs.get("grad_norm")),
            "tokens_per_second": tokens_per_second, "tokens_seen": int(state.num_input_tokens_seen),
            "progress_pct": round(100.0 * step / state.max_steps, 2) if state.max_steps else None,
            "elapsed_s": round(elapsed, 1), "eta_s": _rounded(eta, 1),
        })
        # an evaluation of this step is logged right after: one event carries both, as OpenAI's do
        if not control.should_evaluate:
            self._emit_pending(state)
        self._estimate_finish(eta)

    def _emit_pending(self, state: TrainerState) -> None:
        data, self._pending = self._pending, None
        if data is None:
            return
        parts = []
        for label, key in (("training loss", "train_loss"), ("validation loss", "full_valid_loss")):
            if data.get(key) is not None:
                parts.append(f"{label}={data[key]:.4f}")
        self.context.event_nowait(f"Step {data['step']}/{state.max_steps}: " + (", ".join(parts) or "no loss"),
                                  event_type="metrics", data=data)

    def checkpoint_metrics(self, step: int) -> dict[str, Any]:
        """OpenAI's checkpoint metrics; values of other steps are the latest known, unknown ones null."""
        metrics: dict[str, Any] = dict.fromkeys(CHECKPOINT_METRIC_KEYS)
        metrics.update({key: value for key, value in self.last_train.items() if key != "step"})
        metrics.update({key: value for key, value in self.last_eval.items() if key != "step"})
        metrics["step"] = step
        return metrics

    def _eta_seconds(self, state: TrainerState) -> float | None:
        if not self.step_seconds or not state.max_steps:
            return None
        recent = self.step_seconds[-ETA_WINDOW:]
        return max(0, state.max_steps - state.global_step) * sum(recent) / len(recent)

    def _estimate_finish(self, eta: float | None) -> None:
        moment = time.monotonic()
        if eta is None or moment - self._last_estimate < ESTIMATE_EVERY_S:
            return
        self._last_estimate = moment
        self.context.update(estimated_finish=int(time.time() + eta))

    # measurements never stop a run: a failing probe is logged and the figure left out

    def _sample(self, source: str) -> None:
        try:
            self.monitor.sample(source)
        except Exception:
            log.warning("hardware sample failed", exc_info=True)

    def _gpu_memory(self) -> dict[str, float]:
        try:
            return current_gpu_memory()
        except Exception:
            log.warning("reading GPU memory failed", exc_info=True)
            return {}

    # files -----------------------------------------------------------------

    def _upload(self) -> None:
        """Best effort: the report stage uploads the final files itself; these copies are what a crash leaves."""
        if self.context.lease_lost.is_set():
            return  # another worker owns the job and writes these keys now
        self._last_upload = time.monotonic()
        try:
            self.files.upload()
        except Exception:
            log.warning("uploading the metrics files failed; the next checkpoint or minute tries again",
                        exc_info=True)

    def _upload_if_due(self) -> None:
        """Called from the sampler thread: the periodic copy that a crash leaves behind."""
        if time.monotonic() - self._last_upload >= self.upload_every_s:
            self._upload()

    # checkpoints -----------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.context.lease_lost.is_set():
            raise LeaseLost(self.context.job_id)
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.monitor.phase = "checkpoint"
        self.publish(state.global_step, checkpoint_dir, self.checkpoint_metrics(state.global_step))
        self.monitor.phase = "train"
        self._upload()
