"""Fixtures of the trainer's unit tests: the real SmolLM2 tokenizer (from the shared model cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.models import materialized_base_model, shared_model_cache


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_model_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(materialized_base_model(tmp_path_factory)))
