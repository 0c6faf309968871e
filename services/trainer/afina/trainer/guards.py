"""Stop a run that can no longer produce a useful model, with an error that says what to change.

A NaN or infinite loss never recovers (the weights are NaN from then on), and a loss that
climbs far above where it started is the learning rate diverging: both waste GPU hours if
left running, and both usually mean "lower the learning rate". The guard watches the
logged training loss (every ``logging_steps``) and raises ``TrainingFailed`` from inside
the training loop, so the job fails at that step with the step and the advice.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from afina.core.errors import TrainingFailed


@dataclass(frozen=True)
class DivergencePolicy:
    """A loss whose moving average over ``window`` logged steps exceeds ``factor`` × the best moving
    average so far (and ``min_increase`` above it, in absolute terms) is diverging."""

    window: int = 5
    factor: float = 3.0
    min_increase: float = 2.0
    warmup_logs: int = 5  # early steps are noisy: no divergence verdict before this many logged losses


class LossGuard:
    """Fed every logged training loss; raises ``TrainingFailed`` on NaN/inf or divergence."""

    def __init__(self, learning_rate: float, policy: DivergencePolicy | None = None) -> None:
        self.learning_rate = learning_rate
        self.policy = policy or DivergencePolicy()
        self._recent: deque[float] = deque(maxlen=self.policy.window)
        self._best_average: float | None = None
        self._seen = 0

    def observe(self, step: int, loss: Any) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingFailed(
                f"training loss became {value} at step {step}; the run cannot recover. Lower the learning rate "
                f"(now {self.learning_rate:g}: try learning_rate_multiplier 0.5 or less), check the data for "
                f"examples with no trainable tokens, or use bf16 instead of fp16", code="loss_not_finite")
        self._seen += 1
        self._recent.append(value)
        if len(self._recent) < self.policy.window:
            return
        average = sum(self._recent) / len(self._recent)
        if self._best_average is None or average < self._best_average:
            self._best_average = average
            return
        best = self._best_average
        if (self._seen >= self.policy.warmup_logs and average > best * self.policy.factor
                and average - best > self.policy.min_increase):
            raise TrainingFailed(
                f"training loss is diverging at step {step}: its moving average rose from {best:.3f} to "
                f"{average:.3f}. Lower the learning rate (now {self.learning_rate:g}: try "
                f"learning_rate_multiplier 0.5 or less) or raise warmup", code="loss_diverged")


def loss_guard_callback(guard: LossGuard) -> Any:
    """A transformers ``TrainerCallback`` that feeds ``guard`` each logged training loss."""
    from transformers import TrainerCallback

    class LossGuardCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                guard.observe(state.global_step, logs["loss"])

    return LossGuardCallback()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error, whichever way the framework raised it."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a trainer dependency
        pass
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
