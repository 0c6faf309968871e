"""The streaming merge writes exactly what PEFT's ``merge_and_unload`` + ``save_pretrained`` writes.

Small random Llama, Qwen2 and Gemma checkpoints (hidden 64, two layers) and random LoRA adapters made by
PEFT itself; every output tensor is compared with ``torch.equal`` (value, dtype, shape) against the usual
path run on the same files, and the names must match both ways. Real SmolLM2 weights get the same check in
tests/integration/exporter/test_merge_weights.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from afina.core.catalog import CHATML
from afina.exporter.merge import merge_adapter
from tests.support.tiny_models import (
    LoraSpec,
    TinyShape,
    build_tiny_model,
    differing_tensors,
    load_checkpoint_tensors,
    make_random_adapter,
    peft_merge_and_save,
)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CASES = {
    "llama-bf16-seven-projections": (TinyShape("llama"), "bfloat16", LoraSpec(target_modules=ALL_PROJECTIONS)),
    "llama-fp32-rslora": (TinyShape("llama"), "float32", LoraSpec(target_modules=ALL_PROJECTIONS, r=8,
                                                                  lora_alpha=16, use_rslora=True)),
    "llama-fp16-lora-on-embed-and-lm-head": (TinyShape("llama"), "float16",
                                             LoraSpec(target_modules=("q_proj", "embed_tokens", "lm_head"))),
    "llama-added-tokens-with-embedding-lora": (TinyShape("llama"), "bfloat16",
                                               LoraSpec(target_modules=("v_proj", "embed_tokens"),
                                                        modules_to_save=("lm_head",),
                                                        added_tokens=("<tool>", "</tool>"))),
    "qwen2-trained-biases-and-lora-bias": (TinyShape("qwen2"), "bfloat16",
                                           LoraSpec(target_modules=("q_proj", "k_proj", "v_proj"), bias="all",
                                                    lora_bias=True)),
    "qwen2-modules-to-save-lm-head": (TinyShape("qwen2"), "bfloat16", LoraSpec(modules_to_save=("lm_head",))),
    "gemma-tied-modules-to-save-lm-head": (TinyShape("gemma"), "bfloat16", LoraSpec(modules_to_save=("lm_head",))),
    "gemma-tied-modules-to-save-embed": (TinyShape("gemma"), "bfloat16",
                                         LoraSpec(target_modules=ALL_PROJECTIONS, modules_to_save=("embed_tokens",))),
    "gemma-tied-ensure-weight-tying": (TinyShape("gemma"), "bfloat16",
                                       LoraSpec(modules_to_save=("embed_tokens",), ensure_weight_tying=True)),
    "gemma-tied-added-tokens": (TinyShape("gemma"), "bfloat16", LoraSpec(added_tokens=("<tool>",))),
    "gemma-tied-rslora": (TinyShape("gemma"), "float32", LoraSpec(target_modules=ALL_PROJECTIONS, use_rslora=True)),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """One tiny base per (architecture, dtype), built once for the module."""
    root = tmp_path_factory.mktemp("tiny-bases")
    built: dict[tuple[str, str], Path] = {}
    for shape, dtype, _ in CASES.values():
        key = (shape.architecture, dtype)
        if key not in built:
            built[key] = build_tiny_model(root / f"{shape.architecture}-{dtype}", shape, dtype=dtype)
    return built


def streamed_and_reference(bases: dict[tuple[str, str], Path], case: str, tmp_path: Path) -> tuple[Path, Path]:
    shape, dtype, spec = CASES[case]
    base = bases[(shape.architecture, dtype)]
    adapter = make_random_adapter(base, tmp_path / "adapter", spec)
    reference = peft_merge_and_save(base, adapter, tmp_path / "peft-merged")
    merge_adapter(base, adapter, tmp_path / "streamed", chat_template=CHATML.stock_template)
    return tmp_path / "streamed", reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_merge_is_bit_identical_to_peft(bases: dict[tuple[str, str], Path], case: str,
                                                  tmp_path: Path) -> None:
    streamed, reference = streamed_and_reference(bases, case, tmp_path)
    assert differing_tensors(reference, streamed) == []
    expected_config = json.loads((reference / "config.json").read_text())
    config = json.loads((streamed / "config.json").read_text())
    for key in ("tie_word_embeddings", "vocab_size", "architectures", "model_type"):
        assert config.get(key) == expected_config.get(key), key


def test_the_merge_changes_the_targets_and_nothing_else(bases: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """Guards the identity test against a reference that equals the base (then any copy would pass)."""
    streamed, _ = streamed_and_reference(bases, "llama-bf16-seven-projections", tmp_path)
    base = load_checkpoint_tensors(bases[("llama", "bfloat16")])
    merged = load_checkpoint_tensors(streamed)
    changed = sorted(name for name in base if not (merged[name] == base[name]).all())
    assert changed == sorted(f"model.layers.{layer}.{part}.{projection}.weight" for layer in (0, 1)
                             for part, projections in (("self_attn", ALL_PROJECTIONS[:4]),
                                                       ("mlp", ALL_PROJECTIONS[4:]))
                             for projection in projections)


def test_untouched_tensors_are_copied_without_being_loaded(bases: dict[tuple[str, str], Path],
                                                          tmp_path: Path) -> None:
    base = bases[("llama", "bfloat16")]
    adapter = make_random_adapter(base, tmp_path / "adapter", LoraSpec(target_modules=("q_proj",)))
    result = merge_adapter(base, adapter, tmp_path / "streamed", chat_template=CHATML.stock_template)
    q_proj_bytes = 64 * 64 * 2
    assert result.merged_modules == 2
    assert result.largest_loaded_bytes == q_proj_bytes  # the embeddings (96 x 64) were never read into memory
    assert result.bytes_written == sum(t.numel() * t.element_size() for t in load_checkpoint_tensors(base).values())


def test_tied_embeddings_untied_by_modules_to_save_are_written_twice(bases: dict[tuple[str, str], Path],
                                                                    tmp_path: Path) -> None:
    streamed, _ = streamed_and_reference(bases, "gemma-tied-modules-to-save-lm-head", tmp_path)
    base = load_checkpoint_tensors(bases[("gemma", "bfloat16")])
    merged = load_checkpoint_tensors(streamed)
    assert "lm_head.weight" not in base
    assert (merged["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()
    assert not (merged["lm_head.weight"] == base["model.embed_tokens.weight"]).all()
    assert json.loads((streamed / "config.json").read_text())["tie_word_embeddings"] is False


def test_added_tokens_grow_the_vocabulary_and_the_tokenizer_fits(bases: dict[tuple[str, str], Path],
                                                                tmp_path: Path) -> None:
    streamed, _ = streamed_and_reference(bases, "llama-added-tokens-with-embedding-lora", tmp_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(streamed))
    assert len(tokenizer) == 98 == json.loads((streamed / "config.json").read_text())["vocab_size"]
    assert tokenizer.convert_tokens_to_ids("</tool>") == 97
    assert tokenizer.chat_template == CHATML.stock_template


def test_a_sharded_base_streams_into_bounded_shards_with_an_index(tmp_path: Path) -> None:
    shape = TinyShape("qwen2", num_hidden_layers=3)
    base = build_tiny_model(tmp_path / "base", shape, max_shard_size="60KB")
    assert (base / "model.safetensors.index.json").is_file()
    adapter = make_random_adapter(base, tmp_path / "adapter", LoraSpec(target_modules=ALL_PROJECTIONS))
    reference = peft_merge_and_save(base, adapter, tmp_path / "peft-merged")
    shard_bound = 50_000
    result = merge_adapter(base, adapter, tmp_path / "streamed", chat_template=CHATML.stock_template,
                           max_shard_bytes=shard_bound)
    streamed = tmp_path / "streamed"
    assert differing_tensors(reference, streamed) == []
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == result.shards > 1
    assert files == [f"model-{n:05d}-of-{result.shards:05d}.safetensors" for n in range(1, result.shards + 1)]
    for name in files:
        with safe_open(str(streamed / name), "pt") as handle:
            sizes = [handle.get_slice(key).get_shape() for key in handle.keys()]
        assert len(sizes) == 1 or (streamed / name).stat().st_size <= shard_bound + 4096
    assert index["metadata"]["total_size"] == result.bytes_written


@pytest.mark.parametrize("stored_head", ["a copy of the embedding", "a different matrix"])
def test_a_tied_base_that_stores_lm_head_too_matches_peft(tmp_path: Path, stored_head: str) -> None:
    """Some tied checkpoints carry ``lm_head.weight`` anyway. transformers ties them when it equals the input
    embedding (and saves no ``lm_head.weight``), and keeps them apart when it differs (PEFT's merge then
    writes ``tie_word_embeddings: false``); the streamed merge must do the same."""
    import torch
    from safetensors.torch import load_file, save_file

    base = build_tiny_model(tmp_path / "base", TinyShape("gemma"))
    tensors = load_file(str(base / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed.clone() if stored_head == "a copy of the embedding" \
        else torch.randn_like(embed.float()).to(torch.bfloat16)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = make_random_adapter(base, tmp_path / "adapter", LoraSpec())
    reference = peft_merge_and_save(base, adapter, tmp_path / "peft-merged")
    merge_adapter(base, adapter, tmp_path / "streamed", chat_template=CHATML.stock_template)
    assert differing_tensors(reference, tmp_path / "streamed") == []
    expected_tie = json.loads((reference / "config.json").read_text())["tie_word_embeddings"]
    assert expected_tie is (stored_head == "a copy of the embedding")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["tie_word_embeddings"] is expected_tie
