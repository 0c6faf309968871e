"""A job's training data, each kept once, and the one way each stage reads it.

- ``job.hyperparameters``: what the user asked for (``TrainingSpec.requested()``), written at creation.
- ``job.base_model``: the base model resolved at creation (``ResolvedBaseModel``).
- ``job.training_config``: the ``TrainingConfig`` the train stage sized the run with, written by it.

A resumed attempt resolves from ``training_config`` (so its checkpoint's optimizer and scheduler fit),
a first attempt from the request. Jobs created before these columns existed have no
``base_model``: their stages resolve ``job.model`` the way they always did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afina.core.catalog.registry import resolve_base_model
from afina.core.catalog.resolved import ResolvedBaseModel
from afina.core.catalog.spec import BaseModelSpec
from afina.core.training.resolve import DERIVED_KEYS, OPENAI_KEYS, TrainingConfig
from afina.core.training.spec import AUTO, TrainingSpec, parse_training_spec

if TYPE_CHECKING:
    from afina.core.db.models import Job
    from afina.core.store import ArtifactStore


def requested_spec(job: Job) -> TrainingSpec:
    """What the job asked for, checked again (a stored job is trusted data, but one schema reads it)."""
    return parse_training_spec(job.hyperparameters or {})


def resolution_input(job: Job) -> dict[str, Any]:
    """What the train stage resolves: an earlier attempt's ``training_config`` when there is one, else the request."""
    if job.training_config:
        return {key: value for key, value in job.training_config.items() if key not in DERIVED_KEYS}
    return dict(job.hyperparameters or {})


def stored_training_config(config: TrainingConfig) -> dict[str, Any]:
    """``config`` as ``job.training_config`` keeps it (JSON-ready)."""
    return config.public()


def job_base_model(job: Job, *, store: ArtifactStore | None,
                   allowed_model_dirs: Sequence[Path] | None) -> BaseModelSpec:
    """The job's base model, from the record made at creation; the worker's own allowed dirs are obeyed."""
    if job.base_model:
        return ResolvedBaseModel.model_validate(job.base_model).spec(allowed_model_dirs)
    return resolve_base_model(job.model, chat_family=requested_spec(job).chat_family, store=store,
                              allowed_model_dirs=allowed_model_dirs)


def display_hyperparameters(job: Job) -> dict[str, Any]:
    """OpenAI's three as the job object shows them: the resolved value where the run is sized, else the request."""
    resolved = job.training_config or {}
    requested = job.hyperparameters or {}
    return {name: resolved.get(name, requested.get(name, AUTO)) for name in OPENAI_KEYS}
