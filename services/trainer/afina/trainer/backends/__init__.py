"""Who loads the base model and attaches LoRA: ``hf`` (transformers + PEFT) or ``unsloth`` (CUDA only).

Everything else in a run — data, TRL's SFTTrainer, callbacks, checkpoints, the adapter
files — is the same for both, so the export and serving stages never know which backend
trained. ``auto`` takes Unsloth when the worker has a CUDA device and the package, since
it trains the same LoRA 1.5–1.6× faster than ``hf`` on an H200 (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from afina.core.errors import TrainingFailed

BackendName = Literal["hf", "unsloth"]
BACKEND_CHOICES = ("auto", "hf", "unsloth")


@dataclass(frozen=True)
class ModelRequest:
    """What a backend needs to build the trainable model; the same for every backend."""

    base_model_dir: Path
    device: str  # "cpu" | "cuda"
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_seq_len: int
    quantization: str  # "none" | "4bit" | "8bit"
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    gradient_checkpointing: bool
    pad_token_id: int
    seed: int
    checkpoint_layers: int | None = None  # selective checkpointing (hf): the first N decoder layers; None: all


def unsloth_installed() -> bool:
    # find_spec never imports: importing unsloth patches transformers/TRL, which must not happen by accident
    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str, device: str, *, unsloth_present: bool | None = None) -> BackendName:
    """The backend that will train: ``requested`` checked against the worker, ``auto`` resolved."""
    present = unsloth_installed() if unsloth_present is None else unsloth_present
    if requested not in BACKEND_CHOICES:
        raise TrainingFailed(f"unknown backend {requested!r}; use one of {list(BACKEND_CHOICES)}")
    if requested == "auto":
        return "unsloth" if device == "cuda" and present else "hf"
    if requested == "unsloth":
        if device != "cuda":
            raise TrainingFailed("backend 'unsloth' needs a CUDA device and this worker trains on "
                                 f"{device}; set hyperparameters.backend to 'hf' or 'auto', or run on a GPU worker")
        if not present:
            raise TrainingFailed("backend 'unsloth' was requested but the unsloth package is not installed on this "
                                 "worker; use the trainer's GPU image, or set hyperparameters.backend to 'hf'")
    return requested  # type: ignore[return-value]


def load_trainable_model(backend: BackendName, request: ModelRequest) -> Any:
    """The base model with LoRA attached, ready for TRL's SFTTrainer."""
    if request.quantization != "none" and request.device != "cuda":
        raise TrainingFailed(f"quantization '{request.quantization}' needs a CUDA device (bitsandbytes); "
                             "set hyperparameters.quantization to 'none' to train on the CPU")
    if backend == "unsloth":
        from afina.trainer.backends.unsloth import load_model
    else:
        from afina.trainer.backends.hf import load_model
    return load_model(request)


def prepare_backend(backend: BackendName) -> None:
    """Import what must come first: Unsloth patches transformers, TRL and PEFT when it is imported,
    so it has to be imported before any of them is used (a warm worker does it at start)."""
    if backend == "unsloth":
        # Unsloth turns the Rust tokenizer's threads off unless told otherwise, and a job's start waits on
        # tokenizing its dataset (single-threaded: 3.3 s of a 1B job's warm start on the H100 box's 16 cores);
        # an operator's own setting still wins
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        import unsloth  # noqa: F401
