"""Small random transformers checkpoints and LoRA adapters of real architectures, built offline in seconds.

The exporter's merge is checked against PEFT's own ``merge_and_unload`` on Llama, Qwen2 (biased q/k/v) and
Gemma (tied embeddings, ``1 + weight`` norms) shapes without downloading anything: the config classes of
transformers give the real module layout, a seeded init gives the weights, and a word-level tokenizer
stands in for the real one (the merge copies tokenizer files; it never tokenizes).

``peft_merge_and_save`` is the usual path the streaming merge must reproduce bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Architecture = Literal["llama", "qwen2", "gemma"]
TINY_VOCAB = 96
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class TinyShape:
    """A few layers of a real architecture at hidden size 64: every module kind, none of the bulk."""

    architecture: Architecture
    vocab_size: int = TINY_VOCAB
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool | None = None  # None: the architecture's default (Gemma ties, the others do not)

    def config(self) -> Any:
        from transformers import GemmaConfig, LlamaConfig, Qwen2Config

        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=3)
        if self.architecture == "gemma":
            kwargs["head_dim"] = self.hidden_size // self.num_attention_heads
        if self.tie_word_embeddings is not None:
            kwargs["tie_word_embeddings"] = self.tie_word_embeddings
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[self.architecture]
        return config_class(**kwargs)


def build_tiny_model(out_dir: Path, shape: TinyShape, *, dtype: str = "bfloat16", seed: int = 0,
                     max_shard_size: str | None = None) -> Path:
    """Save a randomly initialized model of ``shape`` (safetensors, in ``dtype``) with a tokenizer to ``out_dir``.

    Norm weights are randomized too (their init is all ones), so a merge that mixed up tensors would show.
    ``max_shard_size`` (e.g. ``"40KB"``) makes a sharded checkpoint with ``model.safetensors.index.json``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.config(), dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + (0 if "bias" in name else 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **save_kwargs)
    save_tiny_tokenizer(out_dir, shape.vocab_size)
    return out_dir


def save_tiny_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level fast tokenizer of ``vocab_size`` tokens, saved to ``out_dir``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(f"w{index}" for index in range(vocab_size - len(SPECIAL_TOKENS)))]
    backend = Tokenizer(WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(str(out_dir))


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings a test adapter is made with (PEFT's ``LoraConfig`` fields of the same names)."""

    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    r: int = 4
    lora_alpha: float = 8
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"
    use_dora: bool = False
    lora_bias: bool = False
    ensure_weight_tying: bool = False
    # grow the vocabulary by these tokens before wrapping: the adapter then carries resized embeddings
    added_tokens: tuple[str, ...] = ()


def make_random_adapter(base_dir: Path, out_dir: Path, spec: LoraSpec, *, seed: int = 1,
                      b_scale: float = 0.05) -> Path:
    """Save a LoRA adapter for ``base_dir`` with every trainable tensor random (seeded), as a trainer would.

    A fresh LoRA has B = 0 and merges to the base; here A, B, the copies of ``modules_to_save`` and trained
    biases all differ from the base, so the merge must really apply each of them.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if spec.added_tokens:
        tokenizer.add_tokens(list(spec.added_tokens))
        model.resize_token_embeddings(len(tokenizer))
    config_kwargs: dict[str, Any] = dict(
        r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora, modules_to_save=list(spec.modules_to_save) or None, bias=spec.bias,
        use_dora=spec.use_dora, lora_bias=spec.lora_bias, task_type="CAUSAL_LM")
    if spec.ensure_weight_tying:
        config_kwargs["ensure_weight_tying"] = True
    peft_model = get_peft_model(model, LoraConfig(**config_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if not parameter.requires_grad:
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.copy_(noise * b_scale)
            elif "lora_A" in name or "lora_embedding_A" in name:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
            else:  # a trained copy (modules_to_save) or a trained bias: moved away from the base
                parameter.add_(noise.to(parameter.dtype) * 0.02)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def peft_merge_and_save(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The usual path: transformers load → ``PeftModel.from_pretrained`` → ``merge_and_unload`` → ``save_pretrained``.

    With resized embeddings the base is resized to the adapter's tokenizer first, as PEFT's documentation
    tells users to do before loading such an adapter.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer_size = len(AutoTokenizer.from_pretrained(str(adapter_dir)))
        if tokenizer_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(tokenizer_size)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out_dir))
    return out_dir


def load_checkpoint_tensors(model_dir: Path) -> dict[str, Any]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, by name."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors: dict[str, Any] = {}
    for name in files:
        tensors.update(load_file(str(model_dir / name)))
    return tensors


def differing_tensors(expected_dir: Path, actual_dir: Path) -> list[str]:
    """Names whose tensors are not ``torch.equal`` (value, dtype and shape) in the two checkpoints; missing or
    extra names are listed too. Empty means bit-identical weights."""
    import torch

    expected = load_checkpoint_tensors(expected_dir)
    actual = load_checkpoint_tensors(actual_dir)
    problems = [f"missing {name}" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"extra {name}" for name in sorted(actual.keys() - expected.keys())]
    for name in sorted(expected.keys() & actual.keys()):
        left, right = expected[name], actual[name]
        if left.dtype != right.dtype or left.shape != right.shape or not torch.equal(left, right):
            problems.append(f"{name}: {left.dtype}{tuple(left.shape)} vs {right.dtype}{tuple(right.shape)}")
    return problems
