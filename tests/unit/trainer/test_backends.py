"""Backend choice and the Unsloth backend's CPU-reachable parts (its calls' arguments)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from afina.core.errors import TrainingFailed
from afina.trainer.backends import ModelRequest, choose_backend, load_trainable_model
from afina.trainer.backends.hf import bitsandbytes_config, lora_config
from afina.trainer.backends.unsloth import from_pretrained_kwargs, get_peft_model_kwargs

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def request(**overrides: object) -> ModelRequest:
    values = {"base_model_dir": Path("/models/llama"), "device": "cuda", "dtype": "bfloat16", "max_seq_len": 2048,
              "quantization": "none", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": SEVEN,
              "gradient_checkpointing": True, "pad_token_id": 2, "seed": 7}
    values.update(overrides)
    return ModelRequest(**values)  # type: ignore[arg-type]


def test_auto_picks_unsloth_only_on_cuda_with_the_package() -> None:
    assert choose_backend("auto", "cuda", unsloth_present=True) == "unsloth"
    assert choose_backend("auto", "cuda", unsloth_present=False) == "hf"
    assert choose_backend("auto", "cpu", unsloth_present=True) == "hf"
    assert choose_backend("hf", "cuda", unsloth_present=True) == "hf"


def test_unsloth_where_it_cannot_run_fails_with_what_to_change() -> None:
    with pytest.raises(TrainingFailed, match="needs a CUDA device.*'hf'"):
        choose_backend("unsloth", "cpu", unsloth_present=True)
    with pytest.raises(TrainingFailed, match="not installed"):
        choose_backend("unsloth", "cuda", unsloth_present=False)
    with pytest.raises(TrainingFailed, match="unknown backend"):
        choose_backend("deepspeed", "cuda", unsloth_present=True)


def test_this_cpu_worker_resolves_auto_to_hf() -> None:
    assert choose_backend("auto", "cpu") == "hf"


def test_quantization_on_the_cpu_is_refused_before_loading() -> None:
    with pytest.raises(TrainingFailed, match="quantization '4bit' needs a CUDA device"):
        load_trainable_model("hf", request(device="cpu", dtype="float32", quantization="4bit"))


def test_unsloth_arguments_mirror_the_request() -> None:
    loading = from_pretrained_kwargs(request(quantization="4bit"))
    assert loading["model_name"] == "/models/llama" and loading["max_seq_length"] == 2048
    assert loading["load_in_4bit"] is True and loading["load_in_8bit"] is False
    assert loading["local_files_only"] is True and loading["full_finetuning"] is False
    assert loading["fix_tokenizer"] is False  # Unsloth's tokenizer is thrown away: no slow-tokenizer load for it
    peft = get_peft_model_kwargs(request())
    assert peft["r"] == 16 and peft["lora_alpha"] == 32 and peft["target_modules"] == list(SEVEN)
    assert peft["use_gradient_checkpointing"] == "unsloth" and peft["random_state"] == 7
    assert get_peft_model_kwargs(request(gradient_checkpointing=False))["use_gradient_checkpointing"] is False


def test_hf_backend_uses_the_same_lora_and_qlora_settings() -> None:
    import torch

    lora = lora_config(request())
    assert lora.r == 16 and lora.lora_alpha == 32 and set(lora.target_modules) == set(SEVEN)
    nf4 = bitsandbytes_config("4bit", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert bitsandbytes_config("8bit", torch.bfloat16).load_in_8bit


def test_selective_checkpointing_recomputes_only_the_first_layers(tmp_path: Path) -> None:
    """The hf backend with checkpoint_layers: the first N decoder layers recompute in backward, the rest keep their
    activations — seen by counting each layer's forward calls in one training step (a checkpointed layer runs
    twice), and the gradients are those of full checkpointing."""
    import torch

    from afina.trainer.backends import ModelRequest
    from afina.trainer.backends.hf import load_model
    from tests.support.tiny_models import TinyShape, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", TinyShape("llama", num_hidden_layers=4), dtype="float32")

    def one_step(**overrides: Any) -> tuple[list[int], list[Any]]:
        request = ModelRequest(base_model_dir=model_dir, device="cpu", dtype="float32", max_seq_len=64,
                               quantization="none", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                               target_modules=("q_proj", "v_proj"), gradient_checkpointing=True, pad_token_id=3,
                               seed=7, **overrides)
        model = load_model(request)
        model.train()
        layers = model.get_base_model().model.layers
        calls = [0] * len(layers)
        for index, layer in enumerate(layers):  # the MLP runs inside the checkpointed forward: twice if recomputed
            layer.mlp.register_forward_pre_hook(lambda *_args, index=index: calls.__setitem__(index, calls[index] + 1))
        ids = torch.arange(10, 42).unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return calls, grads

    selective_calls, selective_grads = one_step(checkpoint_layers=1)
    full_calls, full_grads = one_step()
    assert selective_calls == [2, 1, 1, 1]
    assert full_calls == [2, 2, 2, 2]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(selective_grads, full_grads, strict=True))
