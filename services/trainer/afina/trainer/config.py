"""Hyperparameters of a LoRA SFT run: what the user asked for, resolved into numbers.

A job carries OpenAI's three hyperparameters (``n_epochs``, ``batch_size``,
``learning_rate_multiplier``, each ``"auto"`` or a number) and, optionally,
afina's extras in the same dict. Resolution is pure and idempotent: the resolved
values are written back into ``job.hyperparameters`` (so the API shows what ran),
and resolving them again, as a resumed attempt does, gives the same config, which
is what lets a checkpoint's optimizer and scheduler state be restored as they were.
The resolved values are stored under ``job.hyperparameters["resolved"]``, next to
what the user asked for; a later attempt resolves from them.

``"auto"`` rules (``n`` = training examples left after tokenization):

- ``n_epochs``: OpenAI's cookbook rule. Aim at 3; if ``n × 3 < 100`` use
  ``min(25, 100 // n)``; if ``n × 3 > 25000`` use ``max(1, 25000 // n)``.
- ``batch_size``: ``min(8, max(1, n // 16))`` rounded down to a power of two
  (1 below 32 examples, 2 below 64, 4 below 128, then 8): every epoch has at
  least ~16 optimizer steps, and a batch stays small enough for a CPU or a
  small GPU at ``max_seq_len`` 1024.
- ``learning_rate_multiplier``: 1.0, against a LoRA base rate of 2e-4
  (``learning_rate = 2e-4 × multiplier``, also written back, read-only).
- ``save_steps`` (extra, default): about four checkpoints a run and at least one
  every 50 steps: ``max(1, min(50, ceil(total_steps / 4)))``.

Extras and their defaults: ``lora_r`` 16, ``lora_alpha`` 32, ``lora_dropout``
0.05, ``max_seq_len`` 1024, ``save_steps`` (above), ``logging_steps`` 1,
``max_steps`` none (epochs decide), ``gradient_accumulation_steps`` 1,
``warmup_ratio`` 0.03. Unknown keys are refused: a misspelt ``lora_rank`` must
not silently train with the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from afina.core.errors import InvalidRequest

AUTO = "auto"
BASE_LEARNING_RATE = 2e-4

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
DERIVED_KEYS = ("learning_rate",)  # written back for people to read; ignored on input
# the resolved values live under this key of ``job.hyperparameters``, next to what the user asked for
# (the gateway shows them in place of "auto")
RESOLVED_KEY = "resolved"


@dataclass(frozen=True)
class TrainingConfig:
    """Every number a run needs, resolved; ``public()`` is what ``job.hyperparameters`` shows."""

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

    def public(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("steps_per_epoch")
        values.pop("total_steps")
        return values


# name -> (type, minimum, maximum, default); maximum None = unbounded
_EXTRAS: dict[str, tuple[type, float, float | None, Any]] = {
    "lora_r": (int, 1, 1024, 16),
    "lora_alpha": (int, 1, 4096, 32),
    "lora_dropout": (float, 0.0, 0.999, 0.05),
    "max_seq_len": (int, 16, None, 1024),
    "save_steps": (int, 1, None, None),
    "logging_steps": (int, 1, None, 1),
    "max_steps": (int, 1, None, None),
    "gradient_accumulation_steps": (int, 1, 1024, 1),
    "warmup_ratio": (float, 0.0, 0.999, 0.03),
}
_OPENAI: dict[str, tuple[type, float, float | None]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-6, 100.0),
}


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


def requested_hyperparameters(hyperparameters: Mapping[str, Any] | None,
                              method: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What to resolve: an earlier attempt's ``resolved`` values when there are some (a resumed run must
    train with exactly the config its checkpoint was made with), else the job's hyperparameters over
    ``method.supervised.hyperparameters`` (OpenAI's newer shape)."""
    stored = dict(hyperparameters or {})
    resolved = stored.get(RESOLVED_KEY)
    if isinstance(resolved, Mapping):
        return dict(resolved)
    merged: dict[str, Any] = {}
    supervised = ((method or {}).get("supervised") or {}).get("hyperparameters") or {}
    merged.update({key: value for key, value in supervised.items() if key != RESOLVED_KEY})
    merged.update({key: value for key, value in stored.items() if key != RESOLVED_KEY})
    return merged


def with_resolved(hyperparameters: Mapping[str, Any] | None, config: TrainingConfig) -> dict[str, Any]:
    """The job's hyperparameters as the user gave them, plus ``resolved``: what the API shows over "auto"."""
    return {**(hyperparameters or {}), RESOLVED_KEY: config.public()}


def requested_max_seq_len(requested: Mapping[str, Any], context_length: int | None = None) -> int:
    """``max_seq_len`` alone: tokenization needs it before the example count (and so the autos) is known."""
    value = _number(requested, "max_seq_len", *_EXTRAS["max_seq_len"][:3])
    value = _EXTRAS["max_seq_len"][3] if value is None else value
    if context_length is not None and value > context_length:
        raise InvalidRequest(f"max_seq_len={value} exceeds the base model's context length ({context_length}); "
                             f"set hyperparameters.max_seq_len to at most {context_length}",
                             param="hyperparameters.max_seq_len")
    return value


def resolve_hyperparameters(requested: Mapping[str, Any], n_train: int,
                            context_length: int | None = None) -> TrainingConfig:
    """Turn ``"auto"`` and missing values into numbers; ``InvalidRequest`` naming the field otherwise."""
    unknown = sorted(set(requested) - set(_OPENAI) - set(_EXTRAS) - set(DERIVED_KEYS) - {RESOLVED_KEY})
    if unknown:
        raise InvalidRequest(f"unknown hyperparameter(s) {unknown}; accepted: "
                             f"{sorted([*_OPENAI, *_EXTRAS])}", param=f"hyperparameters.{unknown[0]}")
    if n_train < 1:
        raise InvalidRequest("no training examples to size the run with", param="training_file")
    openai = {name: _number(requested, name, *bounds, allow_auto=True) for name, bounds in _OPENAI.items()}
    extras = {name: _number(requested, name, kind, low, high) for name, (kind, low, high, _) in _EXTRAS.items()}
    for name, (_, _, _, default) in _EXTRAS.items():
        if extras[name] is None:
            extras[name] = default

    n_epochs = auto_epochs(n_train) if openai["n_epochs"] is None else openai["n_epochs"]
    batch_size = auto_batch_size(n_train) if openai["batch_size"] is None else openai["batch_size"]
    multiplier = 1.0 if openai["learning_rate_multiplier"] is None else float(openai["learning_rate_multiplier"])
    per_epoch = steps_per_epoch(n_train, batch_size, extras["gradient_accumulation_steps"])
    total_steps = extras["max_steps"] or per_epoch * n_epochs
    save_steps = extras["save_steps"] or auto_save_steps(total_steps)
    max_seq_len = requested_max_seq_len({"max_seq_len": extras["max_seq_len"]}, context_length)
    return TrainingConfig(
        n_epochs=n_epochs, batch_size=batch_size, learning_rate_multiplier=multiplier,
        learning_rate=BASE_LEARNING_RATE * multiplier, lora_r=extras["lora_r"], lora_alpha=extras["lora_alpha"],
        lora_dropout=float(extras["lora_dropout"]), max_seq_len=max_seq_len, save_steps=save_steps,
        logging_steps=extras["logging_steps"], max_steps=extras["max_steps"],
        gradient_accumulation_steps=extras["gradient_accumulation_steps"],
        warmup_ratio=float(extras["warmup_ratio"]), steps_per_epoch=per_epoch, total_steps=total_steps,
    )


def _number(requested: Mapping[str, Any], name: str, kind: type, low: float, high: float | None,
            *, allow_auto: bool = False) -> Any:
    """The value of ``name`` checked against its type and range; None for missing (or ``"auto"``)."""
    value = requested.get(name)
    if value is None or (allow_auto and value == AUTO):
        return None
    expected = "an integer" if kind is int else "a number"
    choices = f"'{AUTO}' or {expected}" if allow_auto else expected
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or (kind is int and float(value) != int(value)):
        raise InvalidRequest(f"hyperparameters.{name} must be {choices}, got {value!r}",
                             param=f"hyperparameters.{name}")
    value = int(value) if kind is int else float(value)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"hyperparameters.{name}={value} is out of range: use a value {bounds}",
                             param=f"hyperparameters.{name}")
    return value
