"""One materialized base model per test session, shared by every test that needs real weights.

Materializing SmolLM2 (GGUF -> safetensors) takes ~30 s on two cores; it happens
once in the session's base temp dir, and any later call finds it complete.
Set ``AFINA_TEST_MODEL_CACHE`` to a directory to keep the cache across sessions
while developing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMOLLM2 = "smollm2-135m-instruct"


def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory to pass as ``Settings(model_cache_dir=...)``."""
    override = os.environ.get("AFINA_TEST_MODEL_CACHE")
    path = Path(override) if override else tmp_path_factory.getbasetemp() / "model-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def materialized_base_model(tmp_path_factory: pytest.TempPathFactory, model: str = SMOLLM2) -> Path:
    from afina.core.catalog import resolve_base_model
    from afina.core.hfmodels import materialize_base_model

    return materialize_base_model(resolve_base_model(model), shared_model_cache(tmp_path_factory))
