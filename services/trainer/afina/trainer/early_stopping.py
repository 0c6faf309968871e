"""Stop training when the validation loss stops improving (``hyperparameters.early_stopping``).

transformers' own ``EarlyStoppingCallback`` requires ``load_best_model_at_end``, which ties
checkpoint steps to evaluation steps and keeps the best checkpoint around; afina checkpoints
on its own schedule (and uploads them), so this callback only watches ``eval_loss`` and asks
the Trainer to stop. The adapter saved is the last one, trained ``patience`` evaluations past
the best: the job's events say at which step the best loss was.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback


class EarlyStoppingOnValidationLoss(TrainerCallback):
    """Stop after ``patience`` evaluations in a row without the loss falling more than ``threshold`` below the best."""

    def __init__(self, patience: int, threshold: float = 0.0) -> None:
        self.patience = patience
        self.threshold = threshold
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        if loss < self.best_loss - self.threshold:
            self.best_loss, self.best_step = loss, state.global_step
            self.evaluations_without_improvement = 0
            return
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= self.patience:
            self.stopped_at = state.global_step
            control.should_training_stop = True
