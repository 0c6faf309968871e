"""When the hf backend uses Liger's fused kernels, and why not when it does not."""

from __future__ import annotations

import pytest

from afina.trainer.kernels import use_fused_kernels

LIGER_TYPES = frozenset({"llama", "qwen2", "mistral", "gemma2"})


def decide(**overrides: object) -> tuple[bool, str]:
    values = {"speed": "auto", "device": "cuda", "backend": "hf", "model_type": "llama", "installed": True,
              "supported": LIGER_TYPES}
    values.update(overrides)
    decision = use_fused_kernels(**values)  # type: ignore[arg-type]
    return decision.enabled, decision.reason


def test_the_hf_backend_on_cuda_uses_liger_for_a_model_type_it_covers() -> None:
    assert decide() == (True, "Liger's fused kernels for llama")


@pytest.mark.parametrize(("overrides", "why"), [
    ({"speed": "off"}, "speed is off"),
    ({"backend": "unsloth"}, "the unsloth backend brings its own kernels"),
    ({"device": "cpu"}, "Triton kernels: CUDA only"),
    ({"installed": False}, "liger-kernel package is not installed"),
    ({"model_type": "phi3v"}, "no kernels for model type 'phi3v'"),
])
def test_every_reason_not_to_fuse_is_said(overrides: dict[str, object], why: str) -> None:
    enabled, reason = decide(**overrides)
    assert enabled is False and why in reason


def test_this_cpu_worker_never_fuses() -> None:
    """Looked up for real (no package or type list given): a CPU worker answers before importing Liger."""
    assert use_fused_kernels(speed="auto", device="cpu", backend="hf", model_type="llama").enabled is False
