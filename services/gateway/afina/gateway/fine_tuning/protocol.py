"""Fine-tuning requests and objects, mirroring OpenAI's API (``openai.types.fine_tuning``)."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from afina.core.training import OPENAI_KEYS, FineTuningRequest

HYPERPARAMETER_NAMES = OPENAI_KEYS  # what the job object shows, as OpenAI's does
ItemT = TypeVar("ItemT")


# one request model for the API, the YAML job file and the CLI (afina.core.training.request)
CreateJobRequest = FineTuningRequest


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    error: JobError | None
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    seed: int
    estimated_finish: int | None
    metadata: dict[str, str] | None
    method: dict[str, Any]
    integrations: list[Any] = Field(default_factory=list)
    user_provided_suffix: str | None = None


class JobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class JobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class Page(BaseModel, Generic[ItemT]):
    """OpenAI's list envelope; ``after=<last id>`` fetches the next page while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[ItemT]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
