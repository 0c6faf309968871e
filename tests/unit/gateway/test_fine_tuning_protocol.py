"""Job request validation (``FineTuningRequest``, shared with the YAML file and the CLI) and the job object,
without HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from afina.core.db.models import Job
from afina.core.errors import InvalidRequest
from afina.core.training.lifecycle import display_hyperparameters
from afina.gateway.fine_tuning.protocol import CreateJobRequest
from afina.gateway.fine_tuning.service import job_object


def request(**changes: Any) -> CreateJobRequest:
    return CreateJobRequest(**{"model": "smollm2-135m-instruct", "training_file": "file-1", **changes})


def merge_hyperparameters(body: CreateJobRequest) -> dict[str, Any]:
    """What the job stores as asked for: the one merge rule's result."""
    return body.training_spec().requested()


@pytest.mark.parametrize("values", [{"n_epochs": "auto"}, {"n_epochs": 3}, {"n_epochs": 3.0}, {"batch_size": 256},
                                    {"learning_rate_multiplier": 0.1}, {"learning_rate_multiplier": 2},
                                    {"lora_r": 8, "quantization": "4bit", "early_stopping": {"patience": 2}}])
def test_hyperparameters_accept_auto_numbers_and_extras(values: dict[str, Any]) -> None:
    merged = merge_hyperparameters(request(hyperparameters=values))
    assert set(merged) == set(values)  # only what the user set is stored; the job object shows "auto" for the rest


@pytest.mark.parametrize(("values", "field"), [
    ({"n_epochs": 0}, "n_epochs"), ({"n_epochs": 2.5}, "n_epochs"), ({"n_epochs": True}, "n_epochs"),
    ({"n_epochs": "3"}, "n_epochs"), ({"n_epochs": 51}, "n_epochs"), ({"batch_size": -1}, "batch_size"),
    ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
    ({"learning_rate_multiplier": "fast"}, "learning_rate_multiplier"), ({"epochs": 3}, "epochs"),
    ({"lora_r": 0}, "lora_r"), ({"learning_rate": 1e-4}, "learning_rate"), ({"chat_family": "llama9"}, "chat_family"),
    ({"early_stopping": {"patience": 0}}, "early_stopping.patience"),
])
def test_hyperparameters_refuse_everything_else_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        merge_hyperparameters(request(hyperparameters=values))
    assert caught.value.param == f"hyperparameters.{field}"
    with pytest.raises(InvalidRequest) as caught:
        merge_hyperparameters(request(method={"type": "supervised", "supervised": {"hyperparameters": values}}))
    assert caught.value.param == f"method.supervised.hyperparameters.{field}"


def test_rules_between_fields_hold_on_the_merged_hyperparameters() -> None:
    with pytest.raises(InvalidRequest) as caught:
        merge_hyperparameters(request(hyperparameters={"backend": "hf"},
                                      method={"type": "supervised", "supervised": {
                                          "hyperparameters": {"gradient_checkpointing": "unsloth"}}}))
    assert caught.value.param == "hyperparameters.gradient_checkpointing"


def test_integer_valued_floats_become_ints() -> None:
    merged = merge_hyperparameters(request(hyperparameters={"n_epochs": 3.0, "lora_r": 8.0}))
    assert merged["n_epochs"] == 3 and isinstance(merged["n_epochs"], int) and isinstance(merged["lora_r"], int)


@pytest.mark.parametrize("suffix", ["a", "support-bot_2", "x" * 64])
def test_valid_suffixes(suffix: str) -> None:
    assert request(suffix=suffix).suffix == suffix


@pytest.mark.parametrize("suffix", ["", "x" * 65, "has space", "a:b", "é"])
def test_invalid_suffixes(suffix: str) -> None:
    with pytest.raises(ValidationError):
        request(suffix=suffix)


def test_metadata_limits() -> None:
    request(metadata={f"k{i}": "v" * 512 for i in range(16)})
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}):
        with pytest.raises(ValidationError):
            request(metadata=metadata)


def test_both_places_are_read_and_the_method_form_wins() -> None:
    assert merge_hyperparameters(request()) == {}
    both = request(hyperparameters={"n_epochs": 4, "batch_size": 8},
                   method={"type": "supervised", "supervised": {"hyperparameters": {"lora_r": 4, "n_epochs": 2}}})
    assert merge_hyperparameters(both) == {"n_epochs": 2, "batch_size": 8, "lora_r": 4}


def test_top_level_seed_and_hyperparameters_seed_must_agree() -> None:
    body = request(seed=5, hyperparameters={"seed": 6})
    with pytest.raises(InvalidRequest) as caught:
        body.job_seed(body.training_spec())
    assert caught.value.param == "hyperparameters.seed"
    body = request(hyperparameters={"seed": 6})
    assert body.job_seed(body.training_spec()) == 6


@pytest.mark.parametrize("method_type", ["dpo", "reinforcement", "unsupervised"])
def test_only_supervised_method(method_type: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        merge_hyperparameters(request(method={"type": method_type}))
    assert caught.value.param == "method.type"


def _job(**changes: Any) -> Job:
    values: dict[str, Any] = {
        "id": "ftjob-1", "tenant_id": "acme", "model": "smollm2-135m-instruct", "training_file": "file-1",
        "validation_file": None, "suffix": None, "seed": 42, "status": "running", "stage": "train",
        "hyperparameters": {"batch_size": 4}, "training_config": None,
        "method": {"type": "supervised"}, "user_metadata": None,
        "error": None, "fine_tuned_model": None, "trained_tokens": None, "result_files": [], "created_at": 100,
        "finished_at": None, "estimated_finish": None}
    values.update(changes)
    return Job(**values)


def test_resolved_hyperparameters_replace_auto() -> None:
    assert display_hyperparameters(_job()) == {"n_epochs": "auto", "batch_size": 4,
                                               "learning_rate_multiplier": "auto"}
    job = _job(training_config={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.8})
    assert display_hyperparameters(job) == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.8}
    shown = job_object(job)
    assert shown.method["supervised"]["hyperparameters"] == shown.hyperparameters


def test_job_object_has_every_openai_field() -> None:
    shown = job_object(_job(status="failed", error={"code": "invalid_training_file", "message": "line 3: bad",
                                                    "param": "training_file"})).model_dump()
    assert set(shown) >= {"id", "object", "created_at", "finished_at", "model", "fine_tuned_model",
                          "organization_id", "status", "error", "hyperparameters", "training_file",
                          "validation_file", "result_files", "trained_tokens", "seed", "estimated_finish",
                          "metadata", "method", "integrations"}
    assert shown["object"] == "fine_tuning.job" and shown["organization_id"] == "acme"
    assert shown["error"] == {"code": "invalid_training_file", "message": "line 3: bad", "param": "training_file"}
    assert shown["integrations"] == []
