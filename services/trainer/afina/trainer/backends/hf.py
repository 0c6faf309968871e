"""The portable backend: transformers + PEFT on CPU or CUDA, bitsandbytes 4/8-bit on CUDA."""

from __future__ import annotations

from typing import Any

from afina.trainer.backends import ModelRequest


def bitsandbytes_config(quantization: str, compute_dtype: Any) -> Any:
    """QLoRA's recipe: NF4 with double quantization, or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def lora_config(request: ModelRequest) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=request.lora_r, lora_alpha=request.lora_alpha, lora_dropout=request.lora_dropout,
                      target_modules=list(request.target_modules), bias="none", task_type="CAUSAL_LM")


def load_model(request: ModelRequest) -> Any:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, set_seed

    dtype = getattr(torch, request.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if request.device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if request.quantization != "none":
        kwargs["quantization_config"] = bitsandbytes_config(request.quantization, dtype)
    set_seed(request.seed)  # the LoRA init is random: same seed, same run
    model = AutoModelForCausalLM.from_pretrained(str(request.base_model_dir), **kwargs)
    model.config.pad_token_id = request.pad_token_id
    if request.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=request.gradient_checkpointing)
    elif request.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if request.gradient_checkpointing and request.checkpoint_layers is not None:
        limit_checkpointed_layers(model, request.checkpoint_layers)
    model.config.use_cache = False
    return get_peft_model(model, lora_config(request))


def limit_checkpointed_layers(model: Any, keep: int) -> int:
    """Selective activation checkpointing: only the first ``keep`` decoder layers recompute their activations,
    the others keep them (faster, more memory). Returns how many layers checkpoint now.

    transformers checks each ``GradientCheckpointingLayer``'s own ``gradient_checkpointing`` flag on every
    call, so turning the flag off on the later layers after ``gradient_checkpointing_enable`` is all it takes.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and index < keep
    return sum(1 for layer in layers if layer.gradient_checkpointing)
