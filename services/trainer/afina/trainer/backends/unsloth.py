"""The fast CUDA backend: Unsloth's ``FastLanguageModel`` (fused kernels, its own gradient checkpointing).

Only the two calls below differ from the ``hf`` backend; the model it returns is a PEFT
model trained by the same SFTTrainer, and its adapter files are ordinary PEFT files.
"""

from __future__ import annotations

from typing import Any

from afina.trainer.backends import ModelRequest


def from_pretrained_kwargs(request: ModelRequest) -> dict[str, Any]:
    """Arguments of ``FastLanguageModel.from_pretrained`` for ``request`` (pure: tested on CPU)."""
    return {
        "model_name": str(request.base_model_dir),
        "max_seq_length": request.max_seq_len,
        "dtype": None if request.dtype == "auto" else request.dtype,
        "load_in_4bit": request.quantization == "4bit",
        "load_in_8bit": request.quantization == "8bit",
        "full_finetuning": False,
        "local_files_only": True,  # afina never downloads weights
        # the tokenizer Unsloth loads beside the model is thrown away (the recipe trains with afina's own, checked
        # against the catalog): skip its slow-tokenizer load and repairs, seconds of every job's start
        "fix_tokenizer": False,
    }


def get_peft_model_kwargs(request: ModelRequest) -> dict[str, Any]:
    """Arguments of ``FastLanguageModel.get_peft_model`` for ``request`` (pure: tested on CPU)."""
    return {
        "r": request.lora_r,
        "lora_alpha": request.lora_alpha,
        "lora_dropout": request.lora_dropout,
        "target_modules": list(request.target_modules),
        "bias": "none",
        # Unsloth's offloaded checkpointing: the memory of full checkpointing at a fraction of its cost
        "use_gradient_checkpointing": "unsloth" if request.gradient_checkpointing else False,
        "random_state": request.seed,
        "max_seq_length": request.max_seq_len,
    }


def load_model(request: ModelRequest) -> Any:
    import torch
    from unsloth import FastLanguageModel

    kwargs = from_pretrained_kwargs(request)
    kwargs["dtype"] = getattr(torch, request.dtype)
    model, _tokenizer = FastLanguageModel.from_pretrained(**kwargs)  # the recipe keeps afina's own tokenizer
    model.config.pad_token_id = request.pad_token_id
    return FastLanguageModel.get_peft_model(model, **get_peft_model_kwargs(request))
