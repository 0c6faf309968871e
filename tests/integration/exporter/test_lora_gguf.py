"""The LoRA-only GGUF: llama.cpp loads it over the base f16 GGUF and answers exactly like the merged f16 GGUF; what
it cannot carry is refused with the reason, through the converter's child process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from afina.core.catalog import CHATML
from afina.core.errors import ExportFailed
from afina.exporter.fidelity import encode_prompt, stop_token_ids
from afina.exporter.lora_gguf import convert_lora_to_gguf
from afina.exporter.verify import load_hf_tokenizer
from tests.integration.exporter import gguf_fixtures
from tests.integration.exporter.gguf_fixtures import HELD_OUT_PROMPTS
from tests.support.adapters import LORA_ALPHA, LORA_RANK, LORA_TARGETS

pytestmark = pytest.mark.slow

base_f16_gguf = gguf_fixtures.base_f16_gguf
strong_adapter_dir = gguf_fixtures.strong_adapter_dir
strong_merged_dir = gguf_fixtures.strong_merged_dir
other_model_f16_gguf = gguf_fixtures.other_model_f16_gguf


def greedy_answers(model: Path, tokenizer_dir: Path, *, lora: Path | None = None) -> list[list[int]]:
    """The first 32 greedy tokens on each held-out prompt, fed the trained tokenizer's ids."""
    from llama_cpp import Llama

    from afina.exporter.fidelity import _llama_greedy

    tokenizer = load_hf_tokenizer(tokenizer_dir, CHATML.stock_template)
    stops = stop_token_ids(tokenizer, CHATML)
    llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2, seed=0,
                verbose=False)
    try:
        return [_llama_greedy(llm, encode_prompt(tokenizer, chat, 1024).ids, tokens=32, stop_ids=stops).tokens
                for chat in HELD_OUT_PROMPTS]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def lora_gguf(tmp_path_factory: pytest.TempPathFactory, lora_adapter_dir: Path, base_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("lora") / "adapter-lora.gguf"
    convert_lora_to_gguf(lora_adapter_dir, base_model_dir, out, log_path=out.with_suffix(".log"))
    return out


def test_the_file_is_a_llama_cpp_lora_adapter_for_the_base(lora_gguf: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(lora_gguf))
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == LORA_ALPHA
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert len(tensors) == 30 * len(LORA_TARGETS) * 2  # a lora_a and a lora_b per adapted weight
    # ggml shapes (ne0 first): A is inputs x rank, B rank x outputs; SmolLM2: 576 wide, 3 KV heads of 64
    assert tensors["blk.0.attn_q.weight.lora_a"].shape.tolist() == [576, LORA_RANK]
    assert tensors["blk.0.attn_q.weight.lora_b"].shape.tolist() == [LORA_RANK, 576]
    assert tensors["blk.29.attn_v.weight.lora_b"].shape.tolist() == [LORA_RANK, 192]
    assert {tensor.tensor_type.name for tensor in reader.tensors} == {"F32"}


def test_base_plus_adapter_answers_exactly_like_the_merged_gguf(lora_gguf: Path, base_f16_gguf: Path,
                                                               merged_f16_gguf: Path, merged_dir: Path) -> None:
    merged = greedy_answers(merged_f16_gguf, merged_dir)
    assert greedy_answers(base_f16_gguf, merged_dir, lora=lora_gguf) == merged
    # the adapter matters: the base alone answers differently on some prompts
    assert greedy_answers(base_f16_gguf, merged_dir) != merged


def test_a_strong_adapter_with_permuted_heads_carries_over_too(tmp_path: Path, strong_adapter_dir: Path,
                                                               base_model_dir: Path, base_f16_gguf: Path,
                                                               other_model_f16_gguf: Path,
                                                               strong_merged_dir: Path) -> None:
    # q_proj rows are reordered by llama's GGUF conversion: a B left in HF order would answer differently
    out = tmp_path / "strong-lora.gguf"
    convert_lora_to_gguf(strong_adapter_dir, base_model_dir, out, log_path=tmp_path / "log")
    merged = greedy_answers(other_model_f16_gguf, strong_merged_dir)
    base = greedy_answers(base_f16_gguf, strong_merged_dir)
    assert sum(a != b for a, b in zip(merged, base, strict=True)) >= 5
    assert greedy_answers(base_f16_gguf, strong_merged_dir, lora=out) == merged


def edited_adapter(source: Path, target: Path, **config: object) -> Path:
    shutil.copytree(source, target)
    settings = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return target


@pytest.mark.parametrize(("edit", "reason"), [
    ({"use_dora": True}, "a DoRA adapter cannot be a llama.cpp LoRA GGUF"),
    ({"modules_to_save": ["lm_head"]}, "the adapter also trains whole modules (lm_head)"),
    ({"bias": "lora_only"}, "the adapter trains biases"),
])
def test_what_a_lora_gguf_cannot_carry_is_refused_with_the_reason(tmp_path: Path, lora_adapter_dir: Path,
                                                                  base_model_dir: Path, edit: dict[str, object],
                                                                  reason: str) -> None:
    adapter = edited_adapter(lora_adapter_dir, tmp_path / "adapter", **edit)
    with pytest.raises(ExportFailed) as caught:
        convert_lora_to_gguf(adapter, base_model_dir, tmp_path / "out.gguf", log_path=tmp_path / "log")
    assert caught.value.message.startswith(f"the LoRA GGUF conversion failed: {reason}")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.partial").exists()


def test_an_adapter_trained_on_another_base_is_refused(tmp_path: Path, lora_adapter_dir: Path,
                                                       base_model_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    # a base of the same architecture whose attention is twice as wide
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    config = json.loads((base_model_dir / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**config, "hidden_size": 1152}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(1152, 1152)},
              str(other_base / "model.safetensors"))
    with pytest.raises(ExportFailed) as caught:
        convert_lora_to_gguf(lora_adapter_dir, other_base, tmp_path / "out.gguf", log_path=tmp_path / "log")
    assert "is 576x576 but the base's is 1152x1152: it was trained on another base" in caught.value.message
