"""Every training-config field reaches the run: TRL's SFTConfig, the early-stopping callback, the labels
(``assistant_only_loss``), and refusals, naming the field, of what this device cannot do."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from afina.core.errors import InvalidRequest
from afina.core.training import resolve_hyperparameters
from afina.trainer.arguments import activation_checkpointing, sft_arguments, trainer_callbacks
from afina.trainer.data import IGNORE_INDEX, encode_example
from afina.trainer.early_stopping import EarlyStoppingOnValidationLoss


def arguments(tmp_path: Path, *, has_validation: bool = True, **requested: Any) -> Any:
    """The SFTConfig of a CPU run of 64 examples (a CUDA one cannot be built on a machine without a GPU)."""
    config = resolve_hyperparameters(requested, n_train=64, n_validation=8 if has_validation else 0)
    return sft_arguments(config, tmp_path, device="cpu", seed=5, has_validation=has_validation)


def test_the_schedule_optimizer_and_clipping_reach_sft_config(tmp_path: Path) -> None:
    args = arguments(tmp_path, lr_scheduler="cosine", optimizer="adafactor", weight_decay=0.01, max_grad_norm=0.3,
                     warmup_ratio=0.1, eval_steps=3, save_steps=4, logging_steps=2, gradient_accumulation_steps=2,
                     max_steps=9, learning_rate_multiplier=0.5, batch_size=2, max_seq_len=256)
    assert args.lr_scheduler_type == "cosine" and args.optim == "adafactor"
    assert (args.weight_decay, args.max_grad_norm, args.warmup_steps) == (0.01, 0.3, 0.1)
    assert (args.eval_strategy, args.eval_steps, args.save_steps, args.logging_steps) == ("steps", 3, 4, 2)
    assert (args.gradient_accumulation_steps, args.max_steps, args.per_device_train_batch_size) == (2, 9, 2)
    assert args.learning_rate == pytest.approx(1e-4) and args.max_length == 256 and args.seed == 5


def test_warmup_steps_win_over_the_ratio_and_evaluation_defaults_to_each_epoch(tmp_path: Path) -> None:
    args = arguments(tmp_path, warmup_steps=7, warmup_ratio=0.2, batch_size=8)
    assert args.warmup_steps == 7
    assert args.eval_steps == 8  # 64 examples / batch 8: one evaluation an epoch
    assert arguments(tmp_path, has_validation=False).eval_strategy == "no"


@pytest.mark.parametrize(("requested", "device", "backend", "expected"), [
    ({}, "cpu", "hf", False), ({}, "cuda", "hf", True), ({"gradient_checkpointing": True}, "cpu", "hf", True),
    ({"gradient_checkpointing": False}, "cuda", "hf", False), ({}, "cuda", "unsloth", False),
    ({"gradient_checkpointing": True}, "cuda", "unsloth", False),  # Unsloth checkpoints on the model itself
])
def test_activation_checkpointing(requested: dict[str, Any], device: str, backend: str, expected: bool) -> None:
    config = resolve_hyperparameters(requested, n_train=64)
    assert activation_checkpointing(config, device, backend) is expected


def test_the_trainer_checkpoints_activations_as_resolved(tmp_path: Path) -> None:
    assert arguments(tmp_path, gradient_checkpointing=True).activation_checkpointing is True
    assert arguments(tmp_path).activation_checkpointing is False  # auto on a CPU


@pytest.mark.parametrize(("requested", "field"), [
    ({"quantization": "4bit"}, "quantization"), ({"optimizer": "paged_adamw_8bit"}, "optimizer"),
    ({"backend": "unsloth"}, "backend"), ({"gradient_checkpointing": "unsloth"}, "gradient_checkpointing"),
])
def test_cuda_only_settings_are_refused_on_cpu_naming_the_field(tmp_path: Path, requested: dict[str, Any],
                                                                field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        arguments(tmp_path, **requested)
    assert caught.value.param == f"hyperparameters.{field}" and "CUDA" in caught.value.message


def test_early_stopping_needs_validation_examples(tmp_path: Path) -> None:
    config = resolve_hyperparameters({"early_stopping": {"patience": 2}}, n_train=64)
    with pytest.raises(InvalidRequest) as caught:
        sft_arguments(config, tmp_path, device="cpu", seed=1, has_validation=False)
    assert caught.value.param == "hyperparameters.early_stopping"
    (callback,) = trainer_callbacks(config)
    assert isinstance(callback, EarlyStoppingOnValidationLoss) and callback.patience == 2
    assert trainer_callbacks(resolve_hyperparameters({}, n_train=64)) == []


def test_early_stopping_stops_after_patience_evaluations_without_improvement() -> None:
    callback = EarlyStoppingOnValidationLoss(patience=2, threshold=0.05)
    control = SimpleNamespace(should_training_stop=False)
    for step, loss in enumerate([2.0, 1.5, 1.48, 1.6], start=1):  # 1.48 is not 0.05 better than 1.5
        callback.on_evaluate(None, SimpleNamespace(global_step=step * 10), control, metrics={"eval_loss": loss})
        assert control.should_training_stop is (step == 4)
    assert (callback.best_loss, callback.best_step, callback.stopped_at) == (1.5, 20, 40)


def test_assistant_only_loss_off_trains_the_prompt_too(tokenizer: Any) -> None:
    from afina.core.catalog import CHATML

    messages = [{"role": "user", "content": "Qual a capital do Brasil?"},
                {"role": "assistant", "content": "Brasília.", "weight": 0},
                {"role": "user", "content": "E de Portugal?"},
                {"role": "assistant", "content": "Lisboa."}]
    only, _ = encode_example(tokenizer, messages, CHATML.training_template, 512)
    everything, _ = encode_example(tokenizer, messages, CHATML.training_template, 512, assistant_only=False)
    trained = [i for i, label in enumerate(everything["labels"]) if label != IGNORE_INDEX]
    assert set(i for i, label in enumerate(only["labels"]) if label != IGNORE_INDEX) < set(trained)
    assert tokenizer.decode([only["input_ids"][i] for i in range(len(only["labels"]))
                             if only["labels"][i] != IGNORE_INDEX]) == "Lisboa.<|im_end|>"
    skipped = tokenizer.decode([everything["input_ids"][i] for i, label in enumerate(everything["labels"])
                                if label == IGNORE_INDEX])
    assert skipped == "Brasília.<|im_end|>"  # a weight-0 reply stays untrained either way


def test_selective_checkpointing_is_left_to_the_backend(tmp_path: Path) -> None:
    """With checkpoint_layers the hf backend set the flag layer by layer; the Trainer must not turn it on for all."""
    config = resolve_hyperparameters({"gradient_checkpointing": True, "checkpoint_layers": 3}, n_train=64)
    assert activation_checkpointing(config, "cuda", "hf") is False
    assert arguments(tmp_path, gradient_checkpointing=True, checkpoint_layers=3).activation_checkpointing is False


def test_fused_kernels_reach_the_trainer(tmp_path: Path) -> None:
    config = resolve_hyperparameters({}, n_train=64)
    assert sft_arguments(config, tmp_path, device="cpu", seed=5, has_validation=False).use_liger_kernel is False
    fused = sft_arguments(config, tmp_path, device="cpu", seed=5, has_validation=False, fused_kernels=True)
    assert fused.use_liger_kernel is True
