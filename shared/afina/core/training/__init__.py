"""Training configuration: the schema users write (``TrainingSpec``, ``FineTuningRequest``) and its resolution into the
numbers a run uses (``TrainingConfig``). Pure and torch-free: the gateway validates with it, the CLI reads
YAML with it, the trainer resolves with it."""

from __future__ import annotations

from afina.core.training.jobfile import load_job_file, parse_job_file
from afina.core.training.request import FineTuningRequest, Method, SupervisedMethod
from afina.core.training.resolve import (
    DERIVED_KEYS,
    OPENAI_KEYS,
    EarlyStoppingConfig,
    TrainingConfig,
    auto_batch_size,
    auto_epochs,
    auto_save_steps,
    check_max_seq_len,
    requested_max_seq_len,
    resolve_hyperparameters,
    steps_per_epoch,
)
from afina.core.training.spec import (
    AUTO,
    BASE_LEARNING_RATE,
    CUDA_ONLY_OPTIMIZERS,
    EarlyStopping,
    TrainingSpec,
    invalid_request,
    parse_training_spec,
)

__all__ = [
    "AUTO", "BASE_LEARNING_RATE", "CUDA_ONLY_OPTIMIZERS", "DERIVED_KEYS", "OPENAI_KEYS", "EarlyStopping",
    "EarlyStoppingConfig", "FineTuningRequest", "Method", "SupervisedMethod", "TrainingConfig", "TrainingSpec",
    "auto_batch_size", "auto_epochs", "auto_save_steps", "check_max_seq_len", "invalid_request", "load_job_file",
    "parse_job_file", "parse_training_spec", "requested_max_seq_len", "resolve_hyperparameters",
    "steps_per_epoch",
]
