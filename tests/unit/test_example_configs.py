"""Every shipped example config loads, validates (against the pydantic schema and the committed JSON schema),
names a catalog model, points at data that exists, resolves into a run, and says in its header how to run it.
The committed JSON schema is what the generator writes today."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from afina.core.catalog import resolve_base_model
from afina.core.training import load_job_file, resolve_hyperparameters
from afina.core.training.schema import render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "configs" / "examples"
SCHEMA = ROOT / "configs" / "schema" / "training.schema.json"
FAMILY_EXAMPLES = {"llama3": ("llama3.1", "llama3.2"), "qwen2.5": ("qwen2.5",), "qwen3": ("qwen3",),
                   "gemma2": ("gemma2",), "gemma3": ("gemma3",), "mistral": ("mistral",),
                   "deepseek-r1-distill": ("deepseek-r1-qwen", "deepseek-r1-llama"), "smollm2": ("chatml",)}
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_there_is_one_example_per_family() -> None:
    assert sorted(path.stem for path in EXAMPLE_FILES) == sorted(FAMILY_EXAMPLES)


def test_the_committed_json_schema_is_up_to_date() -> None:
    assert SCHEMA.read_text() == render(), "run: python -m afina.core.training.schema > " + str(
        SCHEMA.relative_to(ROOT))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.stem)
def test_example_config_is_valid_and_runnable(path: Path) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    command = f"afina train --config {path.relative_to(ROOT)}"
    assert any(re.search(rf"\b{re.escape(command)}$", line) for line in header), f"{path.name}: no '{command}'"

    job = load_job_file(path)
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA.read_text()))
    spec = resolve_base_model(job.model)
    assert spec.catalog and spec.family.name in FAMILY_EXAMPLES[path.stem]
    for data_file in filter(None, (job.training_file, job.validation_file)):
        assert (path.parent / data_file).is_file(), data_file
    config = resolve_hyperparameters(job.training_spec().requested(), n_train=80,
                                     context_length=spec.context_length,
                                     n_validation=80 if job.validation_file else 0,
                                     default_target_modules=spec.family.target_modules)
    assert config.total_steps >= 1 and config.max_seq_len <= spec.context_length
