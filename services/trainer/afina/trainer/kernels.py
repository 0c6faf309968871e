"""Fused kernels for the ``hf`` backend: Liger's Triton kernels where they apply.

Unsloth brings its own fused kernels; models and setups it does not cover train through
the ``hf`` backend, and there Liger (linkedin/Liger-Kernel) supplies the same kind: a fused
linear cross-entropy that never materialises the logits (the largest activation of a
large-vocabulary model: 32k tokens × 128k vocabulary is 8 GiB in bf16), RMSNorm, SwiGLU and
RoPE. transformers' Trainer patches them into the model when ``use_liger_kernel`` is on.
They are Triton kernels, so CUDA only; a model type Liger has no patch for trains unfused.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class FusedKernels:
    """Whether a run uses Liger's kernels, and why (said in the job's events)."""

    enabled: bool
    reason: str


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_model_types() -> frozenset[str]:
    """The model types Liger has a patch for (imports Liger, hence Triton: call on a CUDA worker only)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def use_fused_kernels(*, speed: str, device: str, backend: str, model_type: str, installed: bool | None = None,
                      supported: frozenset[str] | None = None) -> FusedKernels:
    """The decision for one run; ``installed`` and ``supported`` are looked up when not given (tests give them)."""
    if speed != "auto":
        return FusedKernels(False, "speed is off")
    if backend != "hf":
        return FusedKernels(False, f"the {backend} backend brings its own kernels")
    if device != "cuda":
        return FusedKernels(False, "Liger's kernels are Triton kernels: CUDA only")
    if not (liger_installed() if installed is None else installed):
        return FusedKernels(False, "the liger-kernel package is not installed on this worker")
    types = liger_model_types() if supported is None else supported
    if model_type not in types:
        return FusedKernels(False, f"Liger has no kernels for model type {model_type!r}")
    return FusedKernels(True, f"Liger's fused kernels for {model_type}")
