"""The training schema: every field's bounds, errors that name the field, the old names still accepted,
resolution that is pure and idempotent with the new fields, and the YAML job file (errors with file and line).

The "auto" rules themselves are tested in tests/unit/trainer/test_config.py (through the trainer's re-export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from afina.core.db.models import Job
from afina.core.errors import InvalidRequest
from afina.core.training import (
    BASE_LEARNING_RATE,
    load_job_file,
    parse_job_file,
    parse_training_spec,
    resolve_hyperparameters,
)
from afina.core.training.lifecycle import resolution_input, stored_training_config

EVERYTHING: dict[str, Any] = {
    "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "lora_r": 8, "lora_alpha": 16,
    "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "quantization": "4bit", "max_seq_len": 2048,
    "packing": True, "assistant_only_loss": False, "eval_steps": 5, "save_steps": 10, "logging_steps": 2,
    "early_stopping": {"patience": 2, "threshold": 0.01}, "warmup_ratio": 0.1, "warmup_steps": 3,
    "lr_scheduler": "cosine", "optimizer": "paged_adamw_8bit", "weight_decay": 0.01, "seed": 7,
    "gradient_checkpointing": "unsloth", "max_grad_norm": 0.3, "gradient_accumulation_steps": 2, "max_steps": 40,
    "backend": "unsloth", "oom_retry": True, "chat_family": "llama3.2", "speed": "off",
}


def test_every_field_is_accepted_and_kept() -> None:
    spec = parse_training_spec(EVERYTHING)
    assert spec.requested() == EVERYTHING
    config = resolve_hyperparameters(EVERYTHING, n_train=100, context_length=131_072, n_validation=10)
    public = config.public()
    assert {name: public[name] for name in EVERYTHING} == EVERYTHING
    assert public["learning_rate"] == BASE_LEARNING_RATE * 0.5 and config.total_steps == 40



def test_defaults_are_documented_values() -> None:
    config = resolve_hyperparameters({}, n_train=80)
    assert (config.quantization, config.packing, config.assistant_only_loss) == ("none", False, True)
    assert (config.lr_scheduler, config.optimizer, config.weight_decay, config.max_grad_norm) == \
        ("linear", "adamw_torch", 0.0, 1.0)
    assert (config.gradient_checkpointing, config.backend, config.oom_retry) == ("auto", "auto", False)
    assert (config.speed, config.checkpoint_layers) == ("auto", None)
    assert config.early_stopping is None and config.warmup_steps is None and config.target_modules is None
    assert config.eval_steps == config.steps_per_epoch == 20  # once an epoch


@pytest.mark.parametrize(("field", "value"), [
    ("n_epochs", -1), ("n_epochs", 1.5), ("batch_size", 0), ("batch_size", 257), ("batch_size", "8"),
    ("learning_rate_multiplier", -0.5), ("learning_rate_multiplier", 0), ("learning_rate_multiplier", 101),
    ("learning_rate_multiplier", float("inf")), ("lora_r", 0), ("lora_r", 2048), ("lora_alpha", 0),
    ("lora_dropout", -0.1), ("lora_dropout", 1), ("target_modules", []), ("target_modules", "q_proj"),
    ("target_modules", ["q_proj", "q_proj"]), ("target_modules", ["q proj"]), ("quantization", "2bit"),
    ("quantization", True), ("max_seq_len", 15), ("max_seq_len", 1_000_000), ("packing", "yes"), ("packing", 1),
    ("assistant_only_loss", None), ("eval_steps", 0), ("save_steps", -1), ("logging_steps", 0),
    ("early_stopping", {"patience": 0}), ("early_stopping", {"threshold": -1}), ("early_stopping", "soon"),
    ("warmup_ratio", 1.0), ("warmup_ratio", -0.1), ("warmup_steps", -1), ("lr_scheduler", "exponential"),
    ("optimizer", "adam"), ("weight_decay", 2), ("seed", -1), ("seed", 2**31), ("gradient_checkpointing", "yes"),
    ("max_grad_norm", -1), ("gradient_accumulation_steps", 0), ("max_steps", 0), ("backend", "vllm"),
    ("oom_retry", "true"), ("chat_family", "llama9"), ("chat_family", 3), ("speed", "fast"), ("speed", True),
    ("checkpoint_layers", 0), ("checkpoint_layers", "4"),
])
def test_a_bad_value_is_a_400_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({field: value})
    assert caught.value.param.startswith(f"hyperparameters.{field}"), caught.value.param
    assert caught.value.http_status == 400 and field in caught.value.message


def test_nested_errors_name_the_nested_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({"early_stopping": {"patience": 0}})
    assert caught.value.param == "hyperparameters.early_stopping.patience"
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({"early_stopping": {"patients": 2}})
    assert caught.value.param == "hyperparameters.early_stopping.patients" and "'patience'" in caught.value.message


def test_unknown_names_are_refused_with_the_closest_suggested() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({"lora_rank": 8})
    assert caught.value.param == "hyperparameters.lora_rank" and "did you mean 'lora_r'" in caught.value.message


def test_learning_rate_is_derived_not_given() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({"learning_rate": 1e-4})
    assert caught.value.param == "hyperparameters.learning_rate"
    assert "learning_rate_multiplier" in caught.value.message


def test_rules_between_fields() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({"gradient_checkpointing": "unsloth", "backend": "hf"})
    assert caught.value.param == "hyperparameters.gradient_checkpointing"
    for contradiction in ({"checkpoint_layers": 4, "backend": "unsloth"},
                          {"checkpoint_layers": 4, "gradient_checkpointing": False}):
        with pytest.raises(InvalidRequest) as caught:
            parse_training_spec(contradiction)
        assert caught.value.param == "hyperparameters.checkpoint_layers"
    assert parse_training_spec({"checkpoint_layers": 4, "gradient_checkpointing": True}).checkpoint_layers == 4
    with pytest.raises(InvalidRequest) as caught:
        resolve_hyperparameters({"early_stopping": True}, n_train=20, n_validation=0)
    assert caught.value.param == "hyperparameters.early_stopping" and "validation" in caught.value.message
    resolve_hyperparameters({"early_stopping": True}, n_train=20, n_validation=5)


def test_the_errors_carry_a_prefix_for_openai_method_form() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec({"lora_r": 0}, "method.supervised.hyperparameters")
    assert caught.value.param == "method.supervised.hyperparameters.lora_r"
    with pytest.raises(InvalidRequest) as caught:
        parse_training_spec(["n_epochs", 3])  # type: ignore[arg-type]
    assert caught.value.param == "hyperparameters"


def test_early_stopping_shorthand() -> None:
    assert parse_training_spec({"early_stopping": True}).early_stopping.patience == 3
    assert parse_training_spec({"early_stopping": False}).early_stopping is None


def test_target_modules_default_to_the_family_when_given() -> None:
    family = ("q_proj", "k_proj")
    assert resolve_hyperparameters({}, 10, default_target_modules=family).target_modules == family
    assert resolve_hyperparameters({"target_modules": ["o_proj"]}, 10, default_target_modules=family) \
        .target_modules == ("o_proj",)
    assert resolve_hyperparameters({"target_modules": "all-linear"}, 10).target_modules == "all-linear"


def test_resolution_is_idempotent_with_every_field() -> None:
    requested = {key: value for key, value in EVERYTHING.items() if key not in ("n_epochs", "batch_size")}
    config = resolve_hyperparameters(requested, n_train=100, n_validation=10, default_target_modules=("q_proj",))
    job = Job(hyperparameters=requested, training_config=stored_training_config(config))
    again = resolve_hyperparameters(resolution_input(job), n_train=5000, n_validation=10)
    assert again.public() == config.public()  # the stored numbers win over new autos
    assert "learning_rate" in job.training_config  # shown, and ignored when resolving again
    first_attempt = Job(hyperparameters=requested, training_config=None)
    assert resolution_input(first_attempt) == requested


def test_resolved_values_from_an_older_afina_still_resolve() -> None:
    # what 0004 moved out of hyperparameters["resolved"] of a job made by an older afina
    job = Job(hyperparameters={"n_epochs": "auto"}, training_config={
        "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "learning_rate": 2e-4, "lora_r": 16,
        "lora_alpha": 32, "lora_dropout": 0.05, "max_seq_len": 1024, "save_steps": 15, "logging_steps": 1,
        "max_steps": None, "gradient_accumulation_steps": 1, "warmup_ratio": 0.03})
    config = resolve_hyperparameters(resolution_input(job), n_train=80)
    assert (config.n_epochs, config.batch_size, config.save_steps) == (3, 4, 15)


# job files --------------------------------------------------------------------------------------------------

JOB_YAML = """\
# afina train --config job.yaml
model: llama-3.2-1b-instruct
training_file: data/treino.jsonl
suffix: suporte
hyperparameters:
  n_epochs: 3
  learning_rate_multiplier: 1e-1
  lora_r: 16
  early_stopping:
    patience: 2
"""


def test_a_job_file_reads_into_the_schema() -> None:
    job = parse_job_file(JOB_YAML, "job.yaml")
    assert (job.model, job.training_file, job.validation_file, job.suffix) == \
        ("llama-3.2-1b-instruct", "data/treino.jsonl", None, "suporte")
    assert job.training_spec().requested() == {"n_epochs": 3, "learning_rate_multiplier": 0.1, "lora_r": 16,
                                               "early_stopping": {"patience": 2}}


@pytest.mark.parametrize(("change", "line", "param"), [
    (("lora_r: 16", "lora_r: 0"), 8, "hyperparameters.lora_r"),
    (("    patience: 2", "    patience: -2"), 10, "hyperparameters.early_stopping.patience"),
    (("  lora_r: 16", "  lora_rank: 16"), 8, "hyperparameters.lora_rank"),
    (("suffix: suporte", "sufix: suporte"), 4, "sufix"),
    (("model: llama-3.2-1b-instruct\n", ""), None, "model"),
    (("n_epochs: 3", "n_epochs: [3"), 7, "config"),  # YAML finds the unclosed list on the next line
])
def test_a_bad_job_file_names_file_line_and_field(change: tuple[str, str], line: int | None, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_job_file(JOB_YAML.replace(*change), "configs/job.yaml")
    assert caught.value.param == param
    where = f"configs/job.yaml, line {line}: " if line else "configs/job.yaml: "
    assert caught.value.message.startswith(where), caught.value.message


def test_a_job_file_is_read_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    assert load_job_file(path).model == "llama-3.2-1b-instruct"
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_job_file(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(InvalidRequest, match="mapping"):
        load_job_file(path)
