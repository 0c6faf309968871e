"""A training run's progress, as the job shows it: one metrics event a step, the metrics file, the ETA.

- each logged step becomes one OpenAI ``metrics`` event ("Step 3/20: training loss=1.2300")
  with step, total_steps, train/valid losses, token accuracies, learning rate, tokens/s
  (non-padding), epoch, elapsed and remaining seconds, and GPU memory on CUDA (every rank's, as
  ``gpu_memory_per_rank``, in a data-parallel run); a step that
  is also evaluated (on the whole validation split) carries ``valid_*`` and ``full_valid_*``
  in the same event, null elsewhere;
- each logged step is also a line of ``training_metrics.jsonl`` (with a moving average of the
  loss, grad norm and progress);
- the worker's Prometheus metrics follow the run (step time, tokens/s, loss);
- the job's ``estimated_finish`` follows the mean of the recent steps.

Backend-blind: it reads only what every ``transformers.Trainer`` hands its callbacks (the state
and the logs), and measures the token accuracy itself when the backend's logs lack it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from afina.core.metrics import TRAIN_LOSS, TRAIN_STEP_SECONDS, TRAIN_TOKENS_PER_SECOND
from afina.core.queue.jobs import JobContext
from afina.trainer.accuracy import TokenAccuracyMeter
from afina.trainer.metrics_files import TRAINING_METRICS_FILE, MetricsFiles
from afina.trainer.monitor import current_gpu_memory

log = logging.getLogger("afina.trainer")

CHECKPOINT_METRIC_KEYS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                          "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")
ESTIMATE_EVERY_S = 5.0
LOSS_AVERAGE_WINDOW = 10  # logged steps in ``train_loss_avg_10``
ETA_WINDOW = 20  # recent steps whose mean time predicts the rest


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class ProgressReporter:
    """Turns the Trainer's steps and logs into the job's events, metrics file, Prometheus figures and ETA.

    One reporter serves a job's whole run; ``begin`` starts an attempt (the first, or a retry
    from a checkpoint in the same worker) and forgets what the previous attempt measured.
    """

    def __init__(self, context: JobContext, files: MetricsFiles,
                 rank_memory: Callable[[], list[dict[str, float]]] | None = None) -> None:
        self.context = context
        self.files = files
        self.rank_memory = rank_memory  # a collective: called at every logged training step, on every rank
        self.accuracy = TokenAccuracyMeter()
        self.attempt = 1
        self.resumed_from_step = 0
        self._begin_attempt(time.monotonic())

    def _begin_attempt(self, now: float) -> None:
        self.step_seconds: list[float] = []
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.tokens_per_second: float | None = None
        self._train_started = now
        self._step_started = now
        self._tokens_at_step_start = 0
        self._interval_tokens = 0
        self._interval_seconds = 0.0
        self._last_estimate = 0.0
        self._recent_losses: deque[float] = deque(maxlen=LOSS_AVERAGE_WINDOW)
        self._pending: dict[str, Any] | None = None  # a step's metrics waiting for its evaluation

    # lifecycle -------------------------------------------------------------

    def begin(self, state: Any, attempt: int, model: Any = None) -> None:
        """An attempt starts at ``state.global_step`` (a resumed Trainer has restored it from its checkpoint)."""
        self._begin_attempt(time.monotonic())
        self.attempt = attempt
        self.resumed_from_step = state.global_step
        for record in self.files.records(TRAINING_METRICS_FILE):
            if record.get("train_loss") is not None:
                self._recent_losses.append(record["train_loss"])
        if model is not None and not self.accuracy.attached:
            self.accuracy.attach(model)

    def end(self, state: Any) -> None:
        self._emit_pending(state)
        self.accuracy.detach()

    def close(self) -> None:
        """Stop measuring and wait for the queued events: the last step's event is written before anyone reads."""
        self.accuracy.detach()
        self.context.flush_events()

    # steps -----------------------------------------------------------------

    def step_begin(self, state: Any) -> None:
        self._step_started = time.monotonic()
        self._tokens_at_step_start = state.num_input_tokens_seen

    def step_end(self, state: Any) -> None:
        # the optimizer step: its micro-batches' forward and backward passes and the update (not data
        # loading, evaluation or checkpointing, which happen outside these two hooks)
        seconds = time.monotonic() - self._step_started
        self.step_seconds.append(seconds)
        TRAIN_STEP_SECONDS.observe(seconds)
        self._interval_tokens += state.num_input_tokens_seen - self._tokens_at_step_start
        self._interval_seconds += seconds

    def median_step_seconds(self) -> float:
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2] if ordered else 0.0

    # logs ------------------------------------------------------------------

    def log(self, state: Any, logs: dict[str, Any], *, evaluation_follows: bool) -> None:
        """A training log (``loss``) or an evaluation (``eval_loss``); ``evaluation_follows``: this step is also
        evaluated, and its event waits for the validation figures."""
        if "loss" in logs:
            self._emit_pending(state)  # a step whose announced evaluation never logged
            self._log_training(state, logs, evaluation_follows)
        elif "eval_loss" in logs:
            self._log_evaluation(state, logs)

    def _log_evaluation(self, state: Any, logs: dict[str, Any]) -> None:
        step = state.global_step
        epoch = round(float(state.epoch or 0.0), 4)
        valid_loss = _finite(logs["eval_loss"])
        accuracy = _finite(logs.get("eval_mean_token_accuracy"))
        if accuracy is None:
            accuracy = _rounded(self.accuracy.take("eval"), 6)
        self.last_eval = {"step": step, "valid_loss": valid_loss, "valid_mean_token_accuracy": accuracy,
                          "full_valid_loss": valid_loss, "full_valid_mean_token_accuracy": accuracy}
        if self._pending is None or self._pending["step"] != step:
            self._pending = {"step": step, "total_steps": state.max_steps, "epoch": epoch}
        validation = {key: value for key, value in self.last_eval.items() if key != "step"}
        self._pending.update(validation)
        self.files.append_training({"type": "validation", "timestamp": round(time.time(), 3), "step": step,
                                    "epoch": epoch, "attempt": self.attempt, **validation})
        self._emit_pending(state)

    def _log_training(self, state: Any, logs: dict[str, Any], evaluation_follows: bool) -> None:
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
        learning_rate = _finite(logs.get("learning_rate"))
        self._pending = {
            "step": step, "total_steps": state.max_steps,
            "train_loss": loss, "train_mean_token_accuracy": accuracy,
            "valid_loss": None, "valid_mean_token_accuracy": None,
            "full_valid_loss": None, "full_valid_mean_token_accuracy": None,
            "learning_rate": learning_rate, "tokens_per_second": tokens_per_second, "epoch": epoch,
            "elapsed_s": round(elapsed, 1), "eta_s": _rounded(eta, 1),
            **self._gpu_memory(),
        }
        average = sum(self._recent_losses) / len(self._recent_losses) if self._recent_losses else None
        self.files.append_training({
            "type": "train", "timestamp": round(time.time(), 3), "step": step, "total_steps": state.max_steps,
            "epoch": epoch, "attempt": self.attempt, "train_loss": loss,
            f"train_loss_avg_{LOSS_AVERAGE_WINDOW}": _rounded(average, 6), "train_mean_token_accuracy": accuracy,
            "learning_rate": learning_rate, "grad_norm": _finite(logs.get("grad_norm")),
            "tokens_per_second": tokens_per_second, "tokens_seen": int(state.num_input_tokens_seen),
            "progress_pct": round(100.0 * step / state.max_steps, 2) if state.max_steps else None,
            "elapsed_s": round(elapsed, 1), "eta_s": _rounded(eta, 1),
        })
        # an evaluation of this step is logged right after: one event carries both, as OpenAI's do
        if not evaluation_follows:
            self._emit_pending(state)
        self._estimate_finish(eta)

    def _emit_pending(self, state: Any) -> None:
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

    # the finish estimate ---------------------------------------------------

    def _eta_seconds(self, state: Any) -> float | None:
        if not self.step_seconds or not state.max_steps:
            return None
        recent = self.step_seconds[-ETA_WINDOW:]
        return max(0, state.max_steps - state.global_step) * sum(recent) / len(recent)

    def _estimate_finish(self, eta: float | None) -> None:
        moment = time.monotonic()
        if eta is None or moment - self._last_estimate < ESTIMATE_EVERY_S:
            return
        self._last_estimate = moment
        self.context.record_estimated_finish(int(time.time() + eta))

    def _gpu_memory(self) -> dict[str, Any]:
        # outside the try: the other ranks make the same collective call, whatever this one's probe does
        per_rank = self.rank_memory() if self.rank_memory is not None else []
        # a measurement never stops a run: a failing probe is logged and the figure left out
        try:
            figures: dict[str, Any] = dict(current_gpu_memory())
        except Exception:
            log.warning("reading GPU memory failed", exc_info=True)
            figures = {}
        if per_rank:
            figures["gpu_memory_per_rank"] = per_rank
        return figures
