"""Merging changes exactly the LoRA-targeted weights, by exactly scaling x B @ A, in the base's precision.

Real SmolLM2 weights and a real (perturbed) LoRA adapter, merged once per session: ML work, so ``slow``.
The merge's refusals of a bad base or adapter need no weights and live in tests/unit/exporter/test_merge.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from afina.core.catalog import CHATML
from tests.support.adapters import LORA_ALPHA, LORA_RANK, LORA_TARGETS

pytestmark = pytest.mark.slow


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


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


def test_merged_checkpoint_carries_the_stock_template_and_no_quantization(merged_dir: Path) -> None:
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tokenizer.chat_template == CHATML.stock_template
    assert tokenizer.eos_token == CHATML.eos_token
