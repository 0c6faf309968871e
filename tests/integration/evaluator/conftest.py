"""Fixtures of the evaluator's integration tests: the real SmolLM2 base, a LoRA adapter, its merge, the f16 GGUF
and a Q8_0 of it (each made once per session, shared with the exporter's tests where they run together)."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.exporter.gguf import convert_to_gguf, quantize_gguf
from afina.exporter.merge import merge_adapter
from tests.support import adapters
from tests.support.adapters import base_spec, exporter_shared_dir

exporter_model_cache = adapters.exporter_model_cache
base_model_dir = adapters.base_model_dir
lora_adapter_dir = adapters.lora_adapter_dir


@pytest.fixture(scope="session")
def merged_f16_gguf(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, lora_adapter_dir: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged-f16.gguf"
    if not out.exists():
        merged = exporter_shared_dir(tmp_path_factory) / "merged"
        if not (merged / "config.json").exists():
            merge_adapter(base_model_dir, lora_adapter_dir, merged, chat_template=base_spec().family.stock_template)
        convert_to_gguf(merged, out, log_path=out.with_suffix(".log"))
    return out


@pytest.fixture(scope="session")
def merged_q8_gguf(tmp_path_factory: pytest.TempPathFactory, merged_f16_gguf: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged-q8_0.gguf"
    if not out.exists():
        quantize_gguf(merged_f16_gguf, out, "q8_0")
    return out
