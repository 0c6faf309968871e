"""Merging changes exactly the LoRA-targeted weights, by exactly scaling x B @ A, in the base's precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from afina.core.catalog import CHATML
from afina.core.errors import ExportFailed
from afina.exporter.merge import check_adapter_dir, merge_adapter
from tests.support.adapters import LORA_ALPHA, LORA_RANK, LORA_TARGETS


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


@pytest.mark.slow
def test_merge_changes_only_the_lora_targets(base_model_dir: Path, lora_adapter_dir: Path, merged_dir: Path) -> None:
    base = load_weights(base_model_dir)
    merged = load_weights(merged_dir)
    assert merged.keys() == base.keys()
    targeted = {name for name in base if any(f".{target}.weight" in name for target in LORA_TARGETS)}
    assert len(targeted) == 2 * 30  # q_proj and v_proj of 30 layers
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype, name
        if name in targeted:
            assert not torch.equal(merged[name], tensor), f"{name} unchanged by the merge"
        else:
            assert torch.equal(merged[name], tensor), f"{name} changed although LoRA does not touch it"


@pytest.mark.slow
def test_merged_delta_is_the_scaled_lora_product(base_model_dir: Path, lora_adapter_dir: Path,
                                                 merged_dir: Path) -> None:
    base = load_weights(base_model_dir)
    merged = load_weights(merged_dir)
    adapter = load_file(lora_adapter_dir / "adapter_model.safetensors")
    for layer, target in ((0, "q_proj"), (17, "v_proj")):
        stem = f"model.layers.{layer}.self_attn.{target}"
        lora_a = adapter[f"base_model.model.{stem}.lora_A.weight"]
        lora_b = adapter[f"base_model.model.{stem}.lora_B.weight"]
        expected = (LORA_ALPHA / LORA_RANK) * (lora_b @ lora_a)
        delta = merged[f"{stem}.weight"] - base[f"{stem}.weight"]
        torch.testing.assert_close(delta, expected, atol=2e-6, rtol=1e-4)


@pytest.mark.slow
def test_merged_checkpoint_carries_the_stock_template_and_no_quantization(merged_dir: Path) -> None:
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tokenizer.chat_template == CHATML.stock_template
    assert tokenizer.eos_token == CHATML.eos_token


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
