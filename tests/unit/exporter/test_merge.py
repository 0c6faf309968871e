"""The merge refuses what it cannot merge exactly, with a message that says why, and writes nothing then.

What the merge writes for adapters it accepts is compared with PEFT's own merge in test_merge_identity.py
(tiny generated models) and tests/integration/exporter/test_merge_weights.py (SmolLM2).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from afina.core.catalog import CHATML
from afina.core.errors import ExportFailed
from afina.exporter.merge import check_adapter_dir, merge_adapter
from afina.exporter.merge_plan import LORA_VARIANT_FIELDS, LORA_VARIANT_INITS
from tests.support.tiny_models import LoraSpec, TinyShape, build_tiny_model, make_random_adapter


def fake_adapter(directory: Path, peft_type: str = "LORA", **config: object) -> Path:
    """Just the files the exporter checks before loading anything."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 8, **config}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama") / "base", TinyShape("llama"))


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gemma") / "base", TinyShape("gemma"))


def rewrite_adapter(adapter_dir: Path, *, drop: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                    config: dict[str, object] | None = None) -> Path:
    """Edit a saved adapter the way a foreign or damaged one would differ."""
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / "adapter_model.safetensors"
    tensors = {(rename or {}).get(key, key): value for key, value in load_file(str(weights)).items()
               if not any(part in key for part in drop)}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    if config:
        path = adapter_dir / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return adapter_dir


def assert_refused(base: Path, adapter: Path, out: Path, match: str) -> None:
    with pytest.raises(ExportFailed, match=match):
        merge_adapter(base, adapter, out, chat_template=CHATML.stock_template)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_a_quantized_base_is_refused(tmp_path: Path) -> None:
    fake_base = tmp_path / "base-4bit"
    fake_base.mkdir()
    (fake_base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(ExportFailed, match=r"quantized \(bitsandbytes\).*original 16/32-bit weights"):
        merge_adapter(fake_base, fake_adapter(tmp_path / "adapter"), tmp_path / "out",
                      chat_template=CHATML.stock_template)


def test_base_weights_that_are_not_floats_are_refused(llama_base: Path, tmp_path: Path) -> None:
    """A quantized checkpoint whose config does not say so: the targeted weight itself is packed integers."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32, dtype=torch.uint8)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec())
    assert_refused(base, adapter, tmp_path / "out", r"q_proj.weight is U8, not 16/32-bit floats")


def test_an_adapter_without_safetensors_weights_is_refused(tmp_path: Path) -> None:
    adapter = fake_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")  # never loaded
    with pytest.raises(ExportFailed, match="adapter_model.safetensors missing"):
        check_adapter_dir(adapter)


def test_a_non_lora_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportFailed, match="only LoRA adapters"):
        check_adapter_dir(fake_adapter(tmp_path / "adapter", peft_type="PROMPT_TUNING"))


@pytest.mark.parametrize(("option", "value", "named"), [
    *((name, True, what.split(" (")[0]) for name, what in LORA_VARIANT_FIELDS.items()),
    ("init_lora_weights", "mica", "MiCA"),
    ("rank_pattern", {"q_proj": 16}, "per-module ranks"),
    ("alpha_pattern", {"q_proj": 32}, "per-module alphas"),
    ("layer_replication", [[0, 2]], "layer replication"),
    ("trainable_token_indices", [5, 6], "trainable token deltas"),
    ("target_parameters", ["experts.gate_up_proj"], "bare parameters"),
    ("use_qalora", True, "QA-LoRA"),
    ("fan_in_fan_out", True, "Conv1D"),
])
def test_lora_variants_and_options_that_change_the_merge_are_refused(tmp_path: Path, option: str, value: object,
                                                                     named: str) -> None:
    with pytest.raises(ExportFailed, match=named):
        check_adapter_dir(fake_adapter(tmp_path / "adapter", **{option: value}))


def test_every_lora_variant_of_the_installed_peft_is_refused() -> None:
    """PEFT marks each LoRA variant field ``is_lora_variant``; a new one must be added to the refusals."""
    from peft import LoraConfig

    fields = {field.name: field for field in dataclasses.fields(LoraConfig)}
    variants = {name for name, field in fields.items() if field.metadata.get("is_lora_variant")}
    assert variants <= LORA_VARIANT_FIELDS.keys()
    assert set(fields["init_lora_weights"].metadata["lora_variants"]) <= LORA_VARIANT_INITS.keys()


def test_a_real_dora_adapter_is_refused_by_config_and_by_its_tensors(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(llama_base, tmp_path / "dora", LoraSpec(use_dora=True))
    assert_refused(llama_base, adapter, tmp_path / "out", r"DoRA \(use_dora\)")
    rewrite_adapter(adapter, config={"use_dora": False})  # a config that lies: the magnitude vectors tell
    assert_refused(llama_base, adapter, tmp_path / "out", "DoRA magnitude vectors")


@pytest.mark.parametrize("targets", [("q_proj", "lm_head"), ("q_proj", "embed_tokens")])
def test_lora_on_tied_embeddings_is_refused(gemma_base: Path, tmp_path: Path, targets: tuple[str, ...]) -> None:
    adapter = make_random_adapter(gemma_base, tmp_path / "adapter", LoraSpec(target_modules=targets))
    assert_refused(gemma_base, adapter, tmp_path / "out",
                   rf"LoRA on .*{targets[1]}.*ties its input and output embeddings.*modules_to_save")


def test_an_adapter_of_another_base_is_refused(llama_base: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "wider", TinyShape("llama", hidden_size=128, intermediate_size=256))
    adapter = make_random_adapter(other, tmp_path / "adapter", LoraSpec())
    assert_refused(llama_base, adapter, tmp_path / "out",
                   r"q_proj makes a \[128, 128\] delta.*\[64, 64\].*another base")


def test_an_adapter_for_modules_the_base_lacks_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec())
    rewrite_adapter(adapter, rename={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"})
    assert_refused(llama_base, adapter, tmp_path / "out", r"layers\.7\.self_attn\.q_proj, which the base model has not")


def test_a_lora_without_its_b_matrix_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec())
    rewrite_adapter(adapter, drop=("layers.1.self_attn.v_proj.lora_B",))
    assert_refused(llama_base, adapter, tmp_path / "out", r"layers\.1\.self_attn\.v_proj lacks its A or B")


def test_a_rank_that_contradicts_the_config_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec(r=4))
    rewrite_adapter(adapter, config={"r": 8})
    assert_refused(llama_base, adapter, tmp_path / "out", "has rank 4/4 but adapter_config.json says r=8")


def test_resized_embeddings_without_the_resized_lm_head_are_refused(llama_base: Path, tmp_path: Path) -> None:
    """LoRA on embed_tokens after adding tokens saves the grown embedding but not the grown lm_head: its new
    rows (random at resize time) are lost, so no merge can rebuild the trained model."""
    adapter = make_random_adapter(llama_base, tmp_path / "adapter",
                                LoraSpec(target_modules=("q_proj", "embed_tokens"), added_tokens=("<tool>",)))
    assert_refused(llama_base, adapter, tmp_path / "out",
                   r"resized the embeddings .* not all of them \(model.embed_tokens.weight 97, lm_head.weight 96")


def test_a_tokenizer_larger_than_the_embeddings_is_refused(llama_base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec())
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    tokenizer.add_tokens(["<never-trained>"])
    tokenizer.save_pretrained(str(adapter))
    assert_refused(llama_base, adapter, tmp_path / "out", "tokenizer has 97 tokens but the model embeds 96")


def test_lora_bias_on_a_module_without_bias_is_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec(lora_bias=True))
    assert_refused(llama_base, adapter, tmp_path / "out", r"LoRA bias \(lora_bias\) for .*q_proj, which has no bias")


def test_a_previous_output_is_replaced_whole(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(llama_base, tmp_path / "adapter", LoraSpec())
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier attempt")
    merge_adapter(llama_base, adapter, out, chat_template=CHATML.stock_template)
    weights = sorted(path.name for path in out.glob("*.safetensors*"))
    assert weights == ["model.safetensors"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in out.iterdir()}
    assert not out.with_name("out.partial").exists()
