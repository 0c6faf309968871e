"""The loss guard stops NaN and diverging runs with advice, and leaves healthy noisy runs alone."""

from __future__ import annotations

import math

import pytest

from afina.core.errors import TrainingFailed
from afina.trainer.guards import DivergencePolicy, LossGuard, is_out_of_memory


def test_nan_or_infinite_loss_stops_at_that_step() -> None:
    guard = LossGuard(learning_rate=2e-4)
    guard.observe(1, 2.5)
    with pytest.raises(TrainingFailed, match="step 2") as failure:
        guard.observe(2, math.nan)
    assert failure.value.code == "loss_not_finite" and "learning_rate_multiplier" in failure.value.message
    with pytest.raises(TrainingFailed):
        LossGuard(1e-3).observe(1, math.inf)


def test_a_diverging_loss_stops_the_run() -> None:
    guard = LossGuard(learning_rate=5e-3, policy=DivergencePolicy(window=3, factor=3.0, min_increase=2.0,
                                                                  warmup_logs=3))
    losses = [2.0, 1.8, 1.7, 1.6, 3.0, 6.0, 9.0, 12.0]
    with pytest.raises(TrainingFailed, match="diverging") as failure:
        for step, loss in enumerate(losses, start=1):
            guard.observe(step, loss)
    assert failure.value.code == "loss_diverged" and step == 7  # noqa: PLR2004 - first step over 3x the best


def test_a_noisy_but_healthy_run_is_left_alone() -> None:
    guard = LossGuard(learning_rate=2e-4)
    losses = [3.2, 2.9, 3.1, 2.5, 2.7, 2.2, 2.4, 2.0, 2.6, 1.9, 2.1, 1.7, 1.9, 1.6, 2.3, 1.5] * 3
    for step, loss in enumerate(losses, start=1):
        guard.observe(step, loss)


def test_out_of_memory_is_recognised_in_both_forms() -> None:
    import torch

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))
