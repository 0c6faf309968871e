"""The recipe's ``_setup_*`` steps called one at a time with explicit inputs, as a reader of ``setup`` sees them:
each takes what it needs and returns what it builds, whatever ran before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from afina.core.artifacts.dataset import DatasetManifest
from afina.core.catalog import CATALOG, SMOLLM2_TRAINING_TEMPLATE
from afina.core.errors import InvalidRequest, TrainingFailed
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.core.training import resolve_hyperparameters
from afina.core.training.lifecycle import resolution_input, stored_training_config
from afina.trainer.data import PreparedDataset
from afina.trainer.recipe import LoRAFinetuneRecipe, lora_targets
from tests.support.jobs import context_for, create_job, sample_examples
from tests.support.models import materialized_base_model

SPEC = CATALOG["smollm2-135m-instruct"]
REQUEST = {"n_epochs": 1, "target_modules": ["q_proj", "v_proj"], "max_seq_len": 256}


@pytest.fixture
def recipe(tmp_path: Path) -> LoRAFinetuneRecipe:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    job = create_job(runtime, "acme", "file-test", hyperparameters=dict(REQUEST), stage="train", status="running")
    return LoRAFinetuneRecipe(context_for(runtime, job, "train"))


def prepared(train: list[dict[str, Any]], validation: list[dict[str, Any]]) -> PreparedDataset:
    manifest = DatasetManifest.build(format="openai-chat", splits={}, created_at=0,
                                     counts={"train": len(train), "validation": len(validation)})
    return PreparedDataset(manifest=manifest, train=train, validation=validation)


def test_data_and_rows_are_built_from_their_arguments(recipe: LoRAFinetuneRecipe, tokenizer: Any) -> None:
    examples = sample_examples(14)
    dataset = recipe._setup_data(prepared(examples[:12], examples[12:]), tokenizer, SMOLLM2_TRAINING_TEMPLATE, 256,
                                 assistant_only=True)
    assert len(dataset.train.rows) == 12 and len(dataset.validation.rows) == 2
    assert all(len(row["input_ids"]) <= 256 for row in dataset.train.rows)
    unpacked = recipe._setup_train_rows(dataset.train.rows, 1024, packing=False)
    assert unpacked is dataset.train.rows
    packed = recipe._setup_train_rows(dataset.train.rows, 1024, packing=True)
    assert len(packed) < len(unpacked)
    assert sum(len(row["input_ids"]) for row in packed) == dataset.train.tokens  # every token, once, no padding


def test_the_config_is_resolved_from_its_input_and_stored_once(recipe: LoRAFinetuneRecipe,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = recipe._setup_config(resolution_input(recipe.job), n_train=40, n_validation=0, base=SPEC)
    assert (config.n_epochs, config.batch_size, config.max_seq_len) == (1, 2, 256)
    assert lora_targets(config, SPEC.family) == ("q_proj", "v_proj")
    job = recipe.context.snapshot()
    assert job.training_config == stored_training_config(config)
    assert job.hyperparameters == REQUEST  # the request is never rewritten

    # a later attempt resolves the stored config: the same numbers, and no second write
    writes: list[dict[str, Any]] = []
    later = LoRAFinetuneRecipe(recipe.context)
    monkeypatch.setattr(later.context, "record_training_config", writes.append)
    assert later._setup_config(resolution_input(later.job), n_train=40, n_validation=0, base=SPEC) == config
    assert writes == []


def test_a_config_this_data_cannot_run_fails_before_the_model_loads(recipe: LoRAFinetuneRecipe) -> None:
    with pytest.raises(InvalidRequest, match="early stopping"):
        recipe._setup_config({**REQUEST, "early_stopping": True}, n_train=40, n_validation=0, base=SPEC)


def test_the_family_list_stands_for_all_linear_and_the_default() -> None:
    for asked in ("all-linear", None):
        config = resolve_hyperparameters({"target_modules": asked}, n_train=10)
        assert lora_targets(config, SPEC.family) == tuple(SPEC.family.target_modules)


def test_the_tokenizer_keeps_the_stock_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    tokenizer = LoRAFinetuneRecipe._setup_tokenizer(materialized_base_model(tmp_path_factory), SPEC)
    assert tokenizer.chat_template == SPEC.family.stock_template
    assert tokenizer.eos_token == SPEC.family.eos_token and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_the_device_is_checked_against_the_worker() -> None:
    import torch

    assert LoRAFinetuneRecipe._setup_device("cpu") == "cpu"
    assert LoRAFinetuneRecipe._setup_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingFailed, match="AFINA_TRAINER_DEVICE=cuda"):
            LoRAFinetuneRecipe._setup_device("cuda")
