"""Merging changes exactly the LoRA-targeted weights, by exactly scaling x B @ A, in the base's precision, and
the streamed result is bit-identical to PEFT's ``merge_and_unload`` + ``save_pretrained``.

Real SmolLM2 weights (float32, tied embeddings) and real (perturbed) LoRA adapters: ML work, so ``slow``.
The merge's refusals need no real weights and live in tests/unit/exporter/test_merge.py; the same identity
on tiny Llama, Qwen2 and Gemma shapes is in tests/unit/exporter/test_merge_identity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from afina.core.catalog import CHATML
from afina.exporter.merge import merge_adapter
from tests.support.adapters import LORA_ALPHA, LORA_RANK, LORA_TARGETS, exporter_shared_dir
from tests.support.tiny_models import LoraSpec, differing_tensors, make_random_adapter, peft_merge_and_save

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


def test_streamed_merge_is_bit_identical_to_peft(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path,
                                                 lora_adapter_dir: Path, merged_dir: Path) -> None:
    reference = peft_merge_and_save(base_model_dir, lora_adapter_dir,
                                    exporter_shared_dir(tmp_path_factory) / "peft-merged")
    assert differing_tensors(reference, merged_dir) == []


def test_seven_projections_rslora_and_a_trained_lm_head_match_peft(base_model_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 ties its embeddings; a trained lm_head copy unties them in PEFT's output and in ours."""
    spec = LoraSpec(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                    r=16, lora_alpha=32, use_rslora=True, modules_to_save=("lm_head",))
    adapter = make_random_adapter(base_model_dir, tmp_path / "adapter", spec)
    reference = peft_merge_and_save(base_model_dir, adapter, tmp_path / "peft-merged")
    result = merge_adapter(base_model_dir, adapter, tmp_path / "streamed", chat_template=CHATML.stock_template)
    assert differing_tensors(reference, tmp_path / "streamed") == []
    assert result.merged_modules == 7 * 30 and result.untied_embeddings
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["tie_word_embeddings"] is False
