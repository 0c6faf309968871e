"""Hyperparameter resolution: OpenAI's "auto" rules, afina's extras, refusals, and idempotency."""

from __future__ import annotations

import pytest

from afina.core.db.models import Job
from afina.core.errors import InvalidRequest
from afina.core.training import (
    BASE_LEARNING_RATE,
    auto_batch_size,
    auto_epochs,
    auto_save_steps,
    resolve_hyperparameters,
    steps_per_epoch,
)
from afina.core.training.lifecycle import requested_spec, resolution_input, stored_training_config

AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


@pytest.mark.parametrize(("n_train", "epochs"), [
    (1, 25), (4, 25), (10, 10), (12, 8), (33, 3), (34, 3), (500, 3), (8333, 3), (8334, 2), (9000, 2),
    (30000, 1),
])
def test_auto_epochs_follow_the_cookbook(n_train: int, epochs: int) -> None:
    assert auto_epochs(n_train) == epochs


@pytest.mark.parametrize(("n_train", "batch"), [
    (1, 1), (12, 1), (31, 1), (32, 2), (63, 2), (64, 4), (127, 4), (128, 8), (100_000, 8),
])
def test_auto_batch_size_is_a_small_power_of_two(n_train: int, batch: int) -> None:
    assert auto_batch_size(n_train) == batch


def test_auto_resolves_everything_with_documented_defaults() -> None:
    config = resolve_hyperparameters(AUTO, n_train=80)
    assert (config.n_epochs, config.batch_size, config.learning_rate_multiplier) == (3, 4, 1.0)
    assert config.learning_rate == BASE_LEARNING_RATE
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert (config.max_seq_len, config.logging_steps, config.gradient_accumulation_steps) == (1024, 1, 1)
    assert config.max_steps is None and config.warmup_ratio == 0.03
    assert config.steps_per_epoch == 20 and config.total_steps == 60
    assert config.save_steps == 15  # about four checkpoints a run


def test_empty_hyperparameters_mean_auto() -> None:
    assert resolve_hyperparameters({}, n_train=80) == resolve_hyperparameters(AUTO, n_train=80)


def test_numbers_and_extras_are_kept() -> None:
    config = resolve_hyperparameters({"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5,
                                      "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_seq_len": 256,
                                      "save_steps": 2, "logging_steps": 5, "max_steps": 7,
                                      "gradient_accumulation_steps": 2, "warmup_ratio": 0.1}, n_train=24)
    assert (config.n_epochs, config.batch_size, config.learning_rate) == (2, 4, BASE_LEARNING_RATE * 0.5)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.max_seq_len) == (8, 16, 0.0, 256)
    assert (config.save_steps, config.logging_steps, config.gradient_accumulation_steps) == (2, 5, 2)
    assert config.steps_per_epoch == 3  # 6 batches of 4, accumulated by 2
    assert config.total_steps == 7  # max_steps wins over epochs, as in transformers


def test_integral_floats_are_accepted_as_integers() -> None:
    assert resolve_hyperparameters({"n_epochs": 2.0}, n_train=10).n_epochs == 2


@pytest.mark.parametrize(("total", "save"), [(1, 1), (6, 2), (60, 15), (200, 50), (10_000, 50)])
def test_default_save_interval(total: int, save: int) -> None:
    assert auto_save_steps(total) == save


def test_steps_per_epoch_counts_like_the_trainer() -> None:
    assert steps_per_epoch(12, 4, 1) == 3
    assert steps_per_epoch(13, 4, 1) == 4
    assert steps_per_epoch(13, 4, 3) == 2
    assert steps_per_epoch(1, 8, 4) == 1


@pytest.mark.parametrize(("name", "value"), [
    ("n_epochs", "3"), ("n_epochs", 0), ("n_epochs", 2.5), ("n_epochs", True), ("n_epochs", 51),
    ("batch_size", -1), ("learning_rate_multiplier", 0), ("learning_rate_multiplier", "fast"),
    ("lora_r", 0), ("lora_dropout", 1.0), ("max_seq_len", 8), ("save_steps", 0), ("warmup_ratio", 1),
    ("max_steps", float("nan")),
])
def test_bad_values_are_refused_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_hyperparameters({name: value}, n_train=20)
    assert caught.value.param == f"hyperparameters.{name}"


def test_unknown_names_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="lora_rank"):
        resolve_hyperparameters({"lora_rank": 8}, n_train=20)


def test_max_seq_len_is_bounded_by_the_context_length() -> None:
    with pytest.raises(InvalidRequest, match="context length"):
        resolve_hyperparameters({"max_seq_len": 9000}, n_train=20, context_length=8192)


def test_a_first_attempt_resolves_what_the_job_asked_for() -> None:
    job = Job(hyperparameters={"n_epochs": 4, "batch_size": 2}, method={"type": "supervised"}, training_config=None)
    assert resolution_input(job) == {"n_epochs": 4, "batch_size": 2}
    assert requested_spec(job).n_epochs == 4 and requested_spec(job).lora_r == 16  # the spec's defaults filled in


def test_a_later_attempt_resolves_the_stored_config_to_the_same_numbers() -> None:
    requested = {**AUTO, "lora_r": 8}
    config = resolve_hyperparameters(requested, n_train=80)
    job = Job(hyperparameters=requested, training_config=stored_training_config(config))
    assert job.hyperparameters["n_epochs"] == "auto"  # what the user asked for stays as asked
    assert job.training_config["n_epochs"] == 3 and job.training_config["learning_rate"] == BASE_LEARNING_RATE
    # the derived learning rate is output, never input
    assert "learning_rate" not in resolution_input(job)
    # a resumed attempt resolves from the stored config: the same config, and the same numbers even
    # if the autos would now pick others (tokenization of a changed tokenizer, packing, ...)
    assert resolve_hyperparameters(resolution_input(job), n_train=80) == config
    assert resolve_hyperparameters(resolution_input(job), n_train=500).public() == config.public()
    assert resolve_hyperparameters(requested, n_train=500).public() != config.public()
