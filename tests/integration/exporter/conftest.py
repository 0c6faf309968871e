"""Fixtures of the exporter's integration tests: the base model, a LoRA adapter, its merge and GGUF (each made
once per session, in the session's temp root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.exporter.gguf import convert_to_gguf
from afina.exporter.merge import merge_adapter
from tests.support import adapters
from tests.support.adapters import base_spec, exporter_shared_dir

exporter_model_cache = adapters.exporter_model_cache
base_model_dir = adapters.base_model_dir
lora_adapter_dir = adapters.lora_adapter_dir


@pytest.fixture(scope="session")
def merged_dir(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, lora_adapter_dir: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged"
    if not (out / "config.json").exists():
        merge_adapter(base_model_dir, lora_adapter_dir, out, chat_template=base_spec().family.stock_template)
    return out


@pytest.fixture(scope="session")
def merged_f16_gguf(tmp_path_factory: pytest.TempPathFactory, merged_dir: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged-f16.gguf"
    if not out.exists():
        convert_to_gguf(merged_dir, out, log_path=out.with_suffix(".log"))
    return out
