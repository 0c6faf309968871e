"""Request and response models of ``/v1/batches``, mirroring OpenAI's Batch API (openai-python's ``Batch``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.batches import BATCH_ENDPOINTS, OutputExpiresAfter
from afina.core.training.request import NulFreeStr

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: NulFreeStr = Field(description="a file uploaded with purpose 'batch': one request per line")
    endpoint: Literal[BATCH_ENDPOINTS] = Field(description="the endpoint every line's url names")  # type: ignore[valid-type]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(None, description="up to 16 pairs; key up to 64, value up to 512 chars")
    output_expires_after: OutputExpiresAfter | None = Field(
        None, description="how long the output and error files are kept after their creation (their "
                          "expires_at); past it they are gone and the sweeper deletes them")


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """The tokens of the batch's answered requests, summed (OpenAI's ``BatchUsage``: input is the prompts')."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, Any] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
