"""Job creation validates the whole training config (afina.core.training) and the base model before anything is
stored: a bad value is a 400 naming the field, an unknown model a 400 naming ``model``, and no job row appears."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from afina.core.db import repository as repo
from tests.integration.gateway.conftest import SMOLLM2, Gateway


def _rejected(gateway: Gateway, client: Any, **request: Any) -> dict[str, Any]:
    """The error body of a refused create, after checking the refusal stored no job."""
    before = _job_count(gateway)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**request)
    assert _job_count(gateway) == before, "a refused job must not be stored"
    return caught.value.body


def _job_count(gateway: Gateway) -> int:
    with gateway.runtime.db.session() as session:
        rows, _ = repo.list_jobs(session, "acme", None, 100)
        return len(rows)


@pytest.mark.parametrize(("hyperparameters", "param"), [
    ({"learning_rate_multiplier": -0.1}, "hyperparameters.learning_rate_multiplier"),
    ({"lora_r": 0}, "hyperparameters.lora_r"),
    ({"lora_dropout": 1.5}, "hyperparameters.lora_dropout"),
    ({"quantization": "3bit"}, "hyperparameters.quantization"),
    ({"early_stopping": {"patience": 0}}, "hyperparameters.early_stopping.patience"),
    ({"chat_family": "llama9"}, "hyperparameters.chat_family"),
    ({"lora_rank": 8}, "hyperparameters.lora_rank"),
    ({"learning_rate": 3e-4}, "hyperparameters.learning_rate"),
    ({"gradient_checkpointing": "unsloth", "backend": "hf"}, "hyperparameters.gradient_checkpointing"),
    ({"max_seq_len": 16_384}, "hyperparameters.max_seq_len"),  # over SmolLM2's 8192-token context
])
def test_bad_training_config_is_a_400_naming_the_field(gateway: Gateway, acme, upload,  # noqa: ANN001
                                                        hyperparameters: dict[str, Any], param: str) -> None:
    training = upload()
    body = _rejected(gateway, acme, model=SMOLLM2, training_file=training.id, hyperparameters=hyperparameters)
    assert body["param"] == param and body["type"] == "invalid_request_error", body
    body = _rejected(gateway, acme, model=SMOLLM2, training_file=training.id,
                     method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}})
    assert body["param"].endswith(param.removeprefix("hyperparameters")), body


@pytest.mark.parametrize("model", ["gpt-4o-mini", "meta-llama/Llama-9-1T", "/nonexistent/model", "store://x/y"])
def test_an_unknown_base_model_fails_fast_naming_model(gateway: Gateway, acme, upload, model: str) -> None:  # noqa: ANN001
    body = _rejected(gateway, acme, model=model, training_file=upload().id)
    assert body["param"] in ("model", "hyperparameters.chat_family"), body
    if model == "gpt-4o-mini":
        assert "llama-3.2-1b-instruct" in body["message"] and "qwen3-0.6b" in body["message"]


def test_a_store_base_model_must_be_the_tenants_own(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    body = _rejected(gateway, acme, model="store://models/globex/base", training_file=upload().id,
                     hyperparameters={"chat_family": "chatml"})
    assert body["param"] == "model" and "models/acme/" in body["message"]


def test_seed_given_twice_must_agree(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    body = _rejected(gateway, acme, model=SMOLLM2, training_file=upload().id, seed=1, hyperparameters={"seed": 2})
    assert body["param"] == "hyperparameters.seed"


def test_a_full_config_is_stored_as_asked_and_shown_openai_style(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    extras = {"lora_r": 8, "lora_alpha": 16, "max_seq_len": 512, "lr_scheduler": "cosine", "warmup_steps": 2,
              "early_stopping": {"patience": 2}, "target_modules": ["q_proj", "v_proj"], "seed": 11}
    job = acme.fine_tuning.jobs.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=upload().id,
                                       method={"type": "supervised", "supervised": {
                                           "hyperparameters": {"n_epochs": 2.0, **extras}}})
    assert job.model == SMOLLM2 and job.seed == 11
    assert job.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": "auto",
                                                "learning_rate_multiplier": "auto"}
    with gateway.runtime.db.session() as session:
        row = repo.get_job(session, "acme", job.id)
    # stored once, as asked (no "auto" filled in, no copy under method), and the base model resolved once
    assert row.hyperparameters == {"n_epochs": 2, **extras}
    assert row.method == {"type": "supervised"} and row.training_config is None
    assert row.base_model is not None and row.base_model["id"] == SMOLLM2
    assert row.base_model["family"] == "chatml" and row.base_model["source"] == "catalog"


def test_a_catalog_model_is_accepted_without_its_weights_here(acme, upload) -> None:  # noqa: ANN001
    # the trainer, not the gateway, needs the weights (and says how to get them if they are missing)
    job = acme.fine_tuning.jobs.create(model="qwen3:0.6b", training_file=upload().id)
    assert job.model == "qwen3-0.6b"
