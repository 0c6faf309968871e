"""The bridge between transformers' training loop and the job: events, metrics, checkpoints, stopping.

Imports transformers at module import: only the recipe imports this module, and only
inside a running stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from afina.core.metrics import TRAIN_LOSS, TRAIN_STEP_SECONDS, TRAIN_TOKENS_PER_SECOND
from afina.core.queue.jobs import JobCancelled, JobContext, LeaseLost

CHECKPOINT_METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                          "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")
ESTIMATE_EVERY_S = 5.0

# (step, local checkpoint dir, OpenAI-shaped checkpoint metrics)
CheckpointPublisher = Callable[[int, Path, dict[str, Any]], None]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class JobProgressCallback(TrainerCallback):
    """Reports every step to the job and stops the loop when the job must stop.

    - each logged step becomes one OpenAI ``metrics`` event ("Step 3/20: training loss=1.2300"); a step
      that is also evaluated (on the whole validation split) carries ``valid_*`` and ``full_valid_*``
      in the same event, null elsewhere;
    - at every step end the job is checked: a cancellation saves a checkpoint and stops
      the loop (the recipe then raises ``JobCancelled``); a lost lease raises ``LeaseLost``
      at once, saving nothing, since another worker owns the job now;
    - every checkpoint the Trainer writes is handed to ``publish`` (upload, row, prune).
    """

    def __init__(self, context: JobContext, publish: CheckpointPublisher) -> None:
        self.context = context
        self.publish = publish
        self.cancelled = False
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.tokens_per_second: float | None = None
        self.step_seconds: list[float] = []
        self._step_started = 0.0
        self._tokens_at_step_start = 0
        self._last_estimate = 0.0
        self._pending: dict[str, Any] | None = None  # a step's metrics waiting for its evaluation

    # timing ----------------------------------------------------------------

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._step_started = time.monotonic()
        self._tokens_at_step_start = state.num_input_tokens_seen

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        seconds = time.monotonic() - self._step_started
        self.step_seconds.append(seconds)
        TRAIN_STEP_SECONDS.observe(seconds)
        tokens = state.num_input_tokens_seen - self._tokens_at_step_start
        if seconds > 0:
            self.tokens_per_second = tokens / seconds
            TRAIN_TOKENS_PER_SECOND.set(self.tokens_per_second)
        try:
            self.context.check_continue()
        except JobCancelled:
            self.cancelled = True
            control.should_save = True
            control.should_training_stop = True
            self.context.event(f"Cancellation requested: saving a checkpoint at step {state.global_step} "
                               f"and stopping", level="warn")
        return control

    # reporting -------------------------------------------------------------

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            self._emit_pending(state)  # a step whose announced evaluation never logged
            self.last_train = {"step": step, "train_loss": _finite(logs["loss"]),
                               "train_mean_token_accuracy": _finite(logs.get("mean_token_accuracy"))}
            if self.last_train["train_loss"] is not None:
                TRAIN_LOSS.set(self.last_train["train_loss"])
            self._pending = {
                "step": step, "total_steps": state.max_steps,
                "train_loss": self.last_train["train_loss"],
                "train_mean_token_accuracy": self.last_train["train_mean_token_accuracy"],
                "valid_loss": None, "valid_mean_token_accuracy": None,
                "full_valid_loss": None, "full_valid_mean_token_accuracy": None,
                "learning_rate": _finite(logs.get("learning_rate")),
                "tokens_per_second": round(self.tokens_per_second, 1) if self.tokens_per_second else None,
                "epoch": round(float(state.epoch or 0.0), 4),
            }
            # an evaluation of this step is logged right after: one event carries both, as OpenAI's do
            if not control.should_evaluate:
                self._emit_pending(state)
            self._estimate_finish(state)
        elif "eval_loss" in logs:
            valid_loss = _finite(logs["eval_loss"])
            accuracy = _finite(logs.get("eval_mean_token_accuracy"))
            self.last_eval = {"step": step, "valid_loss": valid_loss, "valid_mean_token_accuracy": accuracy,
                              "full_valid_loss": valid_loss, "full_valid_mean_token_accuracy": accuracy}
            if self._pending is None or self._pending["step"] != step:
                self._pending = {"step": step, "total_steps": state.max_steps,
                                 "epoch": round(float(state.epoch or 0.0), 4)}
            self._pending.update({key: value for key, value in self.last_eval.items() if key != "step"})
            self._emit_pending(state)

    def _emit_pending(self, state: TrainerState) -> None:
        data, self._pending = self._pending, None
        if data is None:
            return
        parts = []
        for label, key in (("training loss", "train_loss"), ("validation loss", "full_valid_loss")):
            if data.get(key) is not None:
                parts.append(f"{label}={data[key]:.4f}")
        self.context.event(f"Step {data['step']}/{state.max_steps}: " + (", ".join(parts) or "no loss"),
                           event_type="metrics", data=data)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._emit_pending(state)

    def checkpoint_metrics(self, step: int) -> dict[str, Any]:
        """OpenAI's checkpoint metrics; values of other steps are the latest known, unknown ones null."""
        metrics: dict[str, Any] = dict.fromkeys(CHECKPOINT_METRIC_KEYS)
        metrics.update({key: value for key, value in self.last_train.items() if key != "step"})
        metrics.update({key: value for key, value in self.last_eval.items() if key != "step"})
        metrics["step"] = step
        return metrics

    def _estimate_finish(self, state: TrainerState) -> None:
        moment = time.monotonic()
        if moment - self._last_estimate < ESTIMATE_EVERY_S or not self.step_seconds:
            return
        self._last_estimate = moment
        recent = self.step_seconds[-20:]
        remaining_s = (state.max_steps - state.global_step) * sum(recent) / len(recent)
        self.context.update(estimated_finish=int(time.time() + remaining_s))

    # checkpoints -----------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.context.lease_lost.is_set():
            raise LeaseLost(self.context.job_id)
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.publish(state.global_step, checkpoint_dir, self.checkpoint_metrics(state.global_step))
