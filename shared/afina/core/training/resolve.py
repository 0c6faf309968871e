"""Hyperparameters of a LoRA SFT run: what the user asked for (``TrainingSpec``), resolved into numbers.

A job carries OpenAI's three hyperparameters (``n_epochs``, ``batch_size``,
``learning_rate_multiplier``, each ``"auto"`` or a number) and, optionally,
afina's extras in the same dict. Resolution is pure and idempotent: the resolved
values are stored once in ``job.training_config`` (so the API shows what ran), and
resolving them again, as a resumed attempt does, gives the same config, which is
what lets a checkpoint's optimizer and scheduler state be restored as they were
(``afina.core.training.lifecycle`` says which of the two a stage resolves).

``"auto"`` rules (``n`` = training examples left after tokenization):

- ``n_epochs``: OpenAI's cookbook rule. Aim at 3; if ``n × 3 < 100`` use
  ``min(25, 100 // n)``; if ``n × 3 > 25000`` use ``max(1, 25000 // n)``.
- ``batch_size``: ``min(8, max(1, n // 16))`` rounded down to a power of two
  (1 below 32 examples, 2 below 64, 4 below 128, then 8): every epoch has at
  least ~16 optimizer steps, and a batch stays small enough for a CPU or a
  small GPU at ``max_seq_len`` 1024.
- ``learning_rate_multiplier``: 1.0, against a LoRA base rate of 2e-4
  (``learning_rate = 2e-4 × multiplier``, also written back, read-only).
- ``save_steps`` (missing): about four checkpoints a run and at least one
  every 50 steps: ``max(1, min(50, ceil(total_steps / 4)))``.
- ``eval_steps`` (missing): once an epoch (``steps_per_epoch``).

The other fields' defaults are ``TrainingSpec``'s: ``lora_r`` 16, ``lora_alpha`` 32,
``lora_dropout`` 0.05, ``max_seq_len`` 1024, ``logging_steps`` 1, ``max_steps`` none
(epochs decide), ``gradient_accumulation_steps`` 1, ``warmup_ratio`` 0.03, linear
schedule, ``adamw_torch``, no weight decay, clipping at 1.0, no quantization,
assistant-only loss, no packing, no early stopping. ``backend`` and
``gradient_checkpointing`` may stay ``"auto"``: they depend on the worker's device,
which the trainer knows and resolution (pure) does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from afina.core.errors import InvalidRequest
from afina.core.training.spec import AUTO, BASE_LEARNING_RATE, TrainingSpec, parse_training_spec

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_AUTO_EPOCHS = 1
MAX_AUTO_EPOCHS = 25
MAX_AUTO_BATCH_SIZE = 8
EXAMPLES_PER_AUTO_BATCH = 16
CHECKPOINTS_PER_RUN = 4
MAX_SAVE_INTERVAL = 50

OPENAI_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
DERIVED_KEYS = ("learning_rate",)  # stored for people to read; ignored when resolving again


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int
    threshold: float


@dataclass(frozen=True)
class TrainingConfig:
    """Every number a run needs, resolved; ``public()`` is what ``job.training_config`` stores."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    max_seq_len: int
    save_steps: int
    logging_steps: int
    max_steps: int | None
    gradient_accumulation_steps: int
    warmup_ratio: float
    steps_per_epoch: int
    total_steps: int
    target_modules: tuple[str, ...] | str | None = None  # None: the family's; "all-linear": every linear layer
    quantization: str = "none"
    packing: bool = False
    assistant_only_loss: bool = True
    eval_steps: int | None = None  # None only for configs built by hand; resolution sets it
    early_stopping: EarlyStoppingConfig | None = None
    warmup_steps: int | None = None
    lr_scheduler: str = "linear"
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int | None = None
    gradient_checkpointing: bool | str = AUTO
    backend: str = AUTO
    oom_retry: bool = False
    num_gpus: int = 1
    gpu_class: str | None = None
    speed: str = AUTO
    checkpoint_layers: int | None = None
    chat_family: str | None = None

    def public(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("steps_per_epoch")
        values.pop("total_steps")
        if isinstance(self.target_modules, tuple):
            values["target_modules"] = list(self.target_modules)
        return values


def auto_epochs(n_train: int) -> int:
    """OpenAI's cookbook rule: 3 epochs, clamped so examples × epochs lies in [100, 25000]."""
    if n_train * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // max(n_train, 1))
    if n_train * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_AUTO_EPOCHS, MAX_TARGET_EXAMPLES // n_train)
    return TARGET_EPOCHS


def auto_batch_size(n_train: int) -> int:
    """``min(8, max(1, n // 16))`` rounded down to a power of two."""
    wanted = min(MAX_AUTO_BATCH_SIZE, max(1, n_train // EXAMPLES_PER_AUTO_BATCH))
    return 1 << (wanted.bit_length() - 1)


def steps_per_epoch(n_train: int, batch_size: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch, counted the way transformers' Trainer counts them."""
    batches = math.ceil(n_train / batch_size)
    return max(1, math.ceil(batches / gradient_accumulation_steps))


def auto_save_steps(total_steps: int) -> int:
    return max(1, min(MAX_SAVE_INTERVAL, math.ceil(total_steps / CHECKPOINTS_PER_RUN)))


def _spec(requested: Mapping[str, Any]) -> TrainingSpec:
    # a stored training config carries the derived learning_rate; it is output, never input
    return parse_training_spec({key: value for key, value in requested.items() if key not in DERIVED_KEYS})


def check_max_seq_len(max_seq_len: int, context_length: int | None) -> int:
    if context_length is not None and max_seq_len > context_length:
        raise InvalidRequest(f"max_seq_len={max_seq_len} exceeds the base model's context length ({context_length}); "
                             f"set hyperparameters.max_seq_len to at most {context_length}",
                             param="hyperparameters.max_seq_len")
    return max_seq_len


def requested_max_seq_len(requested: Mapping[str, Any], context_length: int | None = None) -> int:
    """``max_seq_len`` alone: tokenization needs it before the example count (and so the autos) is known."""
    return check_max_seq_len(_spec(requested).max_seq_len, context_length)


def resolve_hyperparameters(requested: Mapping[str, Any], n_train: int, context_length: int | None = None, *,
                            n_validation: int | None = None,
                            default_target_modules: Sequence[str] | None = None) -> TrainingConfig:
    """Turn ``"auto"`` and missing values into numbers; ``InvalidRequest`` naming the field otherwise.

    ``n_validation`` (when known) lets early stopping without validation data fail here, before the
    model loads; ``default_target_modules`` (the family's) makes ``target_modules`` concrete.
    """
    spec = _spec(requested)
    if n_train < 1:
        raise InvalidRequest("no training examples to size the run with", param="training_file")
    if spec.early_stopping is not None and n_validation == 0:
        raise InvalidRequest("early stopping watches the validation loss, and this job has no validation data: "
                             "give a validation_file (or a validation split) or remove "
                             "hyperparameters.early_stopping", param="hyperparameters.early_stopping")
    n_epochs = auto_epochs(n_train) if spec.n_epochs == AUTO else int(spec.n_epochs)
    batch_size = auto_batch_size(n_train) if spec.batch_size == AUTO else int(spec.batch_size)
    multiplier = 1.0 if spec.learning_rate_multiplier == AUTO else float(spec.learning_rate_multiplier)
    per_epoch = steps_per_epoch(n_train, batch_size, spec.gradient_accumulation_steps)
    total_steps = spec.max_steps or per_epoch * n_epochs
    target_modules: tuple[str, ...] | str | None
    if isinstance(spec.target_modules, list):
        target_modules = tuple(spec.target_modules)
    elif spec.target_modules is None and default_target_modules is not None:
        target_modules = tuple(default_target_modules)
    else:
        target_modules = spec.target_modules
    early = spec.early_stopping
    return TrainingConfig(
        n_epochs=n_epochs, batch_size=batch_size, learning_rate_multiplier=multiplier,
        learning_rate=BASE_LEARNING_RATE * multiplier, lora_r=spec.lora_r, lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout, max_seq_len=check_max_seq_len(spec.max_seq_len, context_length),
        save_steps=spec.save_steps or auto_save_steps(total_steps), logging_steps=spec.logging_steps,
        max_steps=spec.max_steps, gradient_accumulation_steps=spec.gradient_accumulation_steps,
        warmup_ratio=spec.warmup_ratio, steps_per_epoch=per_epoch, total_steps=total_steps,
        target_modules=target_modules, quantization=spec.quantization, packing=spec.packing,
        assistant_only_loss=spec.assistant_only_loss, eval_steps=spec.eval_steps or per_epoch,
        early_stopping=EarlyStoppingConfig(early.patience, early.threshold) if early else None,
        warmup_steps=spec.warmup_steps, lr_scheduler=spec.lr_scheduler, optimizer=spec.optimizer,
        weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm, seed=spec.seed,
        gradient_checkpointing=spec.gradient_checkpointing, backend=spec.backend, oom_retry=spec.oom_retry,
        num_gpus=spec.num_gpus, gpu_class=spec.gpu_class, speed=spec.speed, checkpoint_layers=spec.checkpoint_layers,
        chat_family=spec.chat_family,
    )
