"""``FineTuningRequest``: one shape for a fine-tuning job request, however it arrives.

The API body (OpenAI's ``POST /v1/fine_tuning/jobs``), the YAML job file (``afina train --config``)
and the CLI's flags all become this model, so every field is checked in one place. Hyperparameters
may come in OpenAI's deprecated top-level ``hyperparameters`` or in ``method.supervised.hyperparameters``
(its current shape), or both: ``training_spec`` merges them by the one rule afina has — the current
shape wins, the deprecated one fills in what it does not say (what the API always did).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from afina.core.artifacts.export_options import ExportOptions
from afina.core.errors import InvalidRequest
from afina.core.training.spec import TrainingSpec, parse_training_spec

SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUPPORTED_METHODS = ("supervised",)
TOP_LEVEL_PREFIX = "hyperparameters"
METHOD_PREFIX = "method.supervised.hyperparameters"
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
NUL = "\x00"
NUL_MESSAGE = "contains a NUL character (U+0000), which no afina id, name or filter can hold"


def _no_nul(value: str) -> str:
    if NUL in value:
        raise ValueError(NUL_MESSAGE)
    return value


# PostgreSQL's text columns cannot hold U+0000: a value with one is a 400, never a failed query
NulFreeStr = Annotated[str, AfterValidator(_no_nul)]


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # checked by ``FineTuningRequest.training_spec`` so that errors name ``method.supervised.hyperparameters.<x>``
    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    """``{"type": "supervised", "supervised": {...}}``; other types are parsed so the refusal can name them."""

    model_config = ConfigDict(extra="allow")

    type: str
    supervised: SupervisedMethod | None = None


class FineTuningRequest(BaseModel):
    """A fine-tuning job as a user asks for it (OpenAI's create-job body; also the YAML job file)."""

    model_config = ConfigDict(extra="ignore", title="afina fine-tuning job")

    model: NulFreeStr = Field(min_length=1, description="a catalog id or alias, a local path, a store:// URI, "
                                                        "or one of your ft: models to continue from")
    training_file: NulFreeStr = Field(min_length=1, description="an uploaded file id (a YAML job file may name "
                                                                "a local path, uploaded first)")
    validation_file: NulFreeStr | None = None
    suffix: str | None = Field(None, description="up to 64 letters, digits, '-' or '_', part of the model's name")
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, Any] | None = Field(
        None, description="afina.core.training.TrainingSpec (OpenAI's deprecated place for them)")
    method: Method | None = None
    integrations: list[Any] | None = None
    # afina's extension (the openai client sends it with extra_body={"export": {...}}): what to export and
    # where to publish the model once trained
    export: ExportOptions | None = None

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

    def training_spec(self) -> TrainingSpec:
        """``method.supervised.hyperparameters`` over the top-level ones, checked; ``InvalidRequest`` naming the
        field (``hyperparameters.<x>`` or ``method.supervised.hyperparameters.<x>``, where it was given)."""
        if self.method is not None and self.method.type not in SUPPORTED_METHODS:
            raise InvalidRequest(f"Invalid 'method.type': {self.method.type!r}; afina supports "
                                 f"{list(SUPPORTED_METHODS)} fine-tuning.", param="method.type")
        top = parse_training_spec(self.hyperparameters, TOP_LEVEL_PREFIX).requested()
        supervised = self.method.supervised if self.method is not None else None
        nested = {} if supervised is None else \
            parse_training_spec(supervised.hyperparameters, METHOD_PREFIX).requested()
        # rules between fields (e.g. gradient_checkpointing vs backend) hold on the merged set
        return parse_training_spec({**top, **nested})

    def job_seed(self, spec: TrainingSpec) -> int | None:
        """The top-level ``seed``, else ``hyperparameters.seed``; the two must agree when both are given."""
        if self.seed is not None and spec.seed is not None and self.seed != spec.seed:
            raise InvalidRequest(f"seed={self.seed} and hyperparameters.seed={spec.seed} disagree; give one",
                                 param="hyperparameters.seed")
        return self.seed if self.seed is not None else spec.seed
