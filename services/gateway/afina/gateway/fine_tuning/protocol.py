"""Fine-tuning requests and objects, mirroring OpenAI's API (``openai.types.fine_tuning``)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from afina.core.training import OPENAI_KEYS
from afina.gateway.params import NulFreeStr

SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
HYPERPARAMETER_NAMES = OPENAI_KEYS  # what the job object shows, as OpenAI's does
ItemT = TypeVar("ItemT")


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # validated by the service with afina.core.training's TrainingSpec (so errors name their source)
    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    """``{"type": "supervised", "supervised": {...}}``; other types are parsed so the refusal can name them."""

    model_config = ConfigDict(extra="allow")

    type: str
    supervised: SupervisedMethod | None = None


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # looked up in the registry (PostgreSQL text holds no NUL)
    model: NulFreeStr
    training_file: NulFreeStr
    validation_file: NulFreeStr | None = None
    suffix: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = None
    # afina.core.training.TrainingSpec (configs/schema/training.schema.json), checked by
    # service.merge_hyperparameters: OpenAI's three plus afina's extras, each error naming hyperparameters.<field>
    hyperparameters: dict[str, Any] | None = None
    method: Method | None = None
    integrations: list[Any] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not SUFFIX_PATTERN.fullmatch(value):
            raise ValueError("suffix must be 1 to 64 letters, digits, '-' or '_'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"metadata keys are at most {MAX_METADATA_KEY} characters")
            if len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata values are at most {MAX_METADATA_VALUE} characters")
        return value


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
