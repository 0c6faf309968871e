"""Merge a LoRA adapter into the original 16/32-bit base weights.

Merging into a dequantized 4-bit base gives a model worse than the adapter it
came from (a failure users of other tools report), so the exporter always
merges into the full-precision base that ``materialize_base_model`` keeps, and
refuses a quantized one. The merged model is written in the base's own dtype;
the GGUF converter makes the 16-bit copy.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TOKENIZER_FILE_NAMES
from afina.core.errors import ExportFailed

TOKENIZER_FILES = tuple(sorted(TOKENIZER_FILE_NAMES))


@dataclass(frozen=True)
class MergeResult:
    """What was merged: enough for an event and for the verification report."""

    merged_dir: Path
    lora_rank: int
    target_modules: list[str]
    merged_modules: int
    dtype: str


def check_adapter_dir(adapter_dir: Path) -> dict:
    """The adapter's config; ``ExportFailed`` when the trainer's output is incomplete or not LoRA."""
    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (adapter_dir / name).is_file()]
    if missing:
        raise ExportFailed(f"the trained adapter is incomplete: {', '.join(missing)} missing "
                           "(only safetensors adapters are accepted)")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportFailed(f"adapter type {config.get('peft_type')!r} cannot be merged; only LoRA adapters can")
    return config


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, chat_template: str) -> MergeResult:
    """Write ``base + adapter`` as a transformers checkpoint (safetensors + tokenizer) to ``out_dir``.

    The tokenizer comes from the adapter folder when the trainer saved one (it may carry added
    tokens), else from the base; either way it is saved with ``chat_template``, the family's stock
    template, because that is the template the GGUF must carry.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = check_adapter_dir(adapter_dir)
    base_config = json.loads((base_dir / "config.json").read_text())
    if base_config.get("quantization_config"):
        method = base_config["quantization_config"].get("quant_method", "unknown")
        raise ExportFailed(f"the base model at {base_dir} is quantized ({method}); merging into a dequantized "
                           "quantized base degrades the model, so export needs the original 16/32-bit weights")

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto", low_cpu_mem_usage=True)
    dtype = str(model.dtype).removeprefix("torch.")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # shape or module mismatch: the adapter was trained on another base
        raise ExportFailed(f"the adapter does not fit base model {base_dir.parent.name}: {exc}") from exc
    merged_modules = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    if len(tokenizer) > merged.get_input_embeddings().weight.shape[0]:
        raise ExportFailed(f"the adapter's tokenizer has {len(tokenizer)} tokens but the model embeds "
                           f"{merged.get_input_embeddings().weight.shape[0]}; the trainer must save resized embeddings")
    tokenizer.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    result = MergeResult(merged_dir=out_dir, lora_rank=int(adapter_config.get("r", 0)),
                         target_modules=sorted(_as_list(adapter_config.get("target_modules"))),
                         merged_modules=merged_modules, dtype=dtype)
    del merged, peft_model, model
    gc.collect()
    return result


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]  # type: ignore[union-attr]
