"""The merge refuses what it cannot merge faithfully before it loads any weights.

What the merge does to real weights is checked in tests/integration/exporter/test_merge_weights.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afina.core.catalog import CHATML
from afina.core.errors import ExportFailed
from afina.exporter.merge import check_adapter_dir, merge_adapter


def fake_adapter(directory: Path, peft_type: str = "LORA") -> Path:
    """Just the files the exporter checks before loading anything."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_a_quantized_base_is_refused(tmp_path: Path) -> None:
    fake_base = tmp_path / "base-4bit"
    fake_base.mkdir()
    (fake_base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(ExportFailed, match=r"quantized \(bitsandbytes\).*original 16/32-bit weights"):
        merge_adapter(fake_base, fake_adapter(tmp_path / "adapter"), tmp_path / "out",
                      chat_template=CHATML.stock_template)


def test_an_adapter_without_safetensors_weights_is_refused(tmp_path: Path) -> None:
    adapter = fake_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")  # never loaded
    with pytest.raises(ExportFailed, match="adapter_model.safetensors missing"):
        check_adapter_dir(adapter)


def test_a_non_lora_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportFailed, match="only LoRA adapters"):
        check_adapter_dir(fake_adapter(tmp_path / "adapter", peft_type="PROMPT_TUNING"))
