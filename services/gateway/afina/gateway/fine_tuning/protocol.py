"""Fine-tuning requests and objects, mirroring OpenAI's API (``openai.types.fine_tuning``)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, field_validator

SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")
ItemT = TypeVar("ItemT")


def _auto_or_positive(kind: type, upper: float) -> Any:
    """A validator for ``"auto"`` or a number in (0, upper]; integers only when ``kind`` is int."""

    def validate(value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be 'auto' or a positive {kind.__name__}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("must be 'auto' or a positive integer")
            value = int(value)
        if not 0 < value <= upper:
            raise ValueError(f"must be 'auto' or a number greater than 0 and at most {upper:g}")
        return value

    schema = {"anyOf": [{"const": "auto"}, {"type": "integer" if kind is int else "number", "exclusiveMinimum": 0,
                                             "maximum": upper}]}
    return Annotated[Literal["auto"] | kind, PlainValidator(validate), WithJsonSchema(schema)]


class Hyperparameters(BaseModel):
    """Each value is ``"auto"`` (the trainer picks) or a positive number; unknown names are refused."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: _auto_or_positive(int, 50) | None = None  # type: ignore[valid-type]
    batch_size: _auto_or_positive(int, 256) | None = None  # type: ignore[valid-type]
    learning_rate_multiplier: _auto_or_positive(float, 100) | None = None  # type: ignore[valid-type]
    # afina's extras (LLaMA-Factory/Axolotl names); the trainer documents their defaults
    lora_r: Annotated[int, Field(gt=0, le=1024)] | None = None
    lora_alpha: Annotated[int, Field(gt=0, le=4096)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    max_seq_len: Annotated[int, Field(ge=16, le=131072)] | None = None
    save_steps: Annotated[int, Field(gt=0)] | None = None
    logging_steps: Annotated[int, Field(gt=0)] | None = None
    max_steps: Annotated[int, Field(gt=0)] | None = None
    gradient_accumulation_steps: Annotated[int, Field(gt=0, le=1024)] | None = None
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """``{"type": "supervised", "supervised": {...}}``; other types are parsed so the refusal can name them."""

    model_config = ConfigDict(extra="allow")

    type: str
    supervised: SupervisedMethod | None = None


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None
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
