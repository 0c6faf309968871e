"""What a LoRA GGUF can carry and how PEFT's scale becomes llama.cpp's ``alpha / rank`` (the conversion itself, on
real weights, is in tests/integration/exporter/test_lora_gguf.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from afina.core.errors import ExportFailed
from afina.exporter.lora_gguf import _adapter_config, _check_base_shape, _lora_pairs, _pattern_value, _scale_factor

Q = "model.layers.0.self_attn.q_proj"


def pair(prefix: str, rank: int = 4, inputs: int = 8, outputs: int = 6) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{prefix}.lora_A.weight": torch.zeros(rank, inputs),
            f"base_model.model.{prefix}.lora_B.weight": torch.zeros(outputs, rank)}


def adapter(tmp_path: Path, **config: object) -> Path:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                              "bias": "none", **config}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    return tmp_path


def test_pairs_are_keyed_by_the_base_weight_name() -> None:
    pairs = _lora_pairs({**pair(Q), **pair("model.layers.0.mlp.down_proj", outputs=8, inputs=12)})
    assert list(pairs) == [f"{Q}.weight", "model.layers.0.mlp.down_proj.weight"]
    lora_a, lora_b = pairs["model.layers.0.mlp.down_proj.weight"]
    assert tuple(lora_a.shape) == (4, 12) and tuple(lora_b.shape) == (8, 4)


@pytest.mark.parametrize(("weights", "reason"), [
    ({"base_model.model.lm_head.weight": torch.zeros(6, 8)}, "is not a LoRA A/B matrix"),
    ({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 10)}, "LoRA on the token embeddings"),
    ({f"base_model.model.{Q}.lora_A.weight": torch.zeros(4, 8)}, "has only one of lora_A/lora_B"),
    ({f"base_model.model.{Q}.lora_A.weight": torch.zeros(4, 8),
      f"base_model.model.{Q}.lora_B.weight": torch.zeros(6, 3)}, "do not have the shapes (r x in, out x r)"),
    ({}, "holds no LoRA matrices"),
])
def test_anything_but_lora_pairs_is_refused(weights: dict[str, torch.Tensor], reason: str) -> None:
    with pytest.raises(ExportFailed, match=reason.replace("(", r"\(").replace(")", r"\)")):
        _lora_pairs(weights)


@pytest.mark.parametrize(("config", "reason"), [
    ({"use_dora": True}, "a DoRA adapter cannot be a llama.cpp LoRA GGUF"),
    ({"bias": "all"}, "the adapter trains biases"),
    ({"lora_bias": True}, "the adapter trains biases"),
    ({"modules_to_save": ["embed_tokens", "lm_head"]}, r"whole modules \(embed_tokens, lm_head\)"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "a IA3 adapter is not a LoRA"),
])
def test_adapters_a_lora_gguf_cannot_carry_are_refused(tmp_path: Path, config: dict[str, object],
                                                       reason: str) -> None:
    with pytest.raises(ExportFailed, match=reason):
        _adapter_config(adapter(tmp_path, **config))


def test_a_plain_lora_config_is_accepted(tmp_path: Path) -> None:
    assert _adapter_config(adapter(tmp_path))["r"] == 8


def test_plain_and_uniform_rslora_scales_need_no_folding() -> None:
    assert _scale_factor({"r": 8, "lora_alpha": 16}, Q, 8, written_alpha=16.0) == 1.0
    # rsLoRA: alpha / sqrt(r); written as alpha * sqrt(r) so that llama.cpp's alpha / r gives the same
    rslora = {"r": 16, "lora_alpha": 32, "use_rslora": True}
    assert _scale_factor(rslora, Q, 16, written_alpha=32 * math.sqrt(16)) == pytest.approx(1.0, rel=1e-12)


def test_per_module_alpha_and_rank_are_folded_into_b() -> None:
    config = {"r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": 32}, "rank_pattern": {"v_proj": 4}}
    assert _scale_factor(config, Q, 8, written_alpha=16.0) == pytest.approx(2.0)  # 32/8 where llama.cpp has 16/8
    # a different rank alone needs nothing: llama.cpp reads the rank from B's shape
    assert _scale_factor(config, "model.layers.0.self_attn.v_proj", 4, written_alpha=16.0) == pytest.approx(1.0)
    rslora = {**config, "use_rslora": True}
    written = 16 * math.sqrt(8)
    assert _scale_factor(rslora, "model.layers.0.self_attn.v_proj", 4, written_alpha=written) == \
        pytest.approx((16 / math.sqrt(4)) / (written / 4))


def test_patterns_match_whole_trailing_module_names() -> None:
    patterns = {"q_proj": 32.0, "layers.1.mlp.up_proj": 8.0}
    assert _pattern_value(patterns, Q, 16.0) == 32.0
    assert _pattern_value(patterns, "model.layers.0.self_attn.qq_proj", 16.0) == 16.0
    assert _pattern_value(patterns, "model.layers.1.mlp.up_proj", 16.0) == 8.0
    assert _pattern_value(patterns, "model.layers.11.mlp.up_proj", 16.0) == 16.0


def test_lora_on_a_tied_output_layer_or_another_base_is_refused() -> None:
    lora_a, lora_b = torch.zeros(4, 8), torch.zeros(6, 4)
    with pytest.raises(ExportFailed, match="shares with the token embeddings"):
        _check_base_shape("lm_head.weight", lora_a, lora_b, {}, tied=True)
    with pytest.raises(ExportFailed, match="is 6x8 but the base's is 12x8: it was trained on another base"):
        _check_base_shape(f"{Q}.weight", lora_a, lora_b, {f"{Q}.weight": (12, 8)}, tied=False)
    with pytest.raises(ExportFailed, match="which the base model does not have"):
        _check_base_shape(f"{Q}.weight", lora_a, lora_b, {"model.norm.weight": (8,)}, tied=False)
    _check_base_shape(f"{Q}.weight", lora_a, lora_b, {f"{Q}.weight": (6, 8)}, tied=False)
