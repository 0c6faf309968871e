"""A batch (OpenAI's ``/v1/batches``) is a job of its own (``kind="batch"``, stage ``batch``, queue ``batch``).

Being a job, a batch gets the lease, heartbeat, retries, recovery and cooperative cancellation of every stage;
what is batch-specific lives in its row's ``method["batch"]`` as a ``BatchSpec``: the request (endpoint, input
file, the key that created it) and the progress the worker records after each request, so a worker killed
mid-batch resumes after the last recorded line instead of running finished lines again. The answers
themselves are in the store, next to that progress (``output.partial.jsonl``, ``errors.partial.jsonl``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from afina.core import ids
from afina.core.db.models import Job
from afina.core.file_expiry import ExpiresAfter

BATCH_KIND = "batch"
BATCH_STAGE = "batch"
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETION_WINDOWS = ("24h",)
COMPLETION_WINDOW_S = {"24h": 24 * 3600}  # a batch not finished this long after its creation expires
BATCH_INPUT_PURPOSE = "batch"
BATCH_OUTPUT_PURPOSE = "batch_output"


class OutputExpiresAfter(ExpiresAfter):
    """OpenAI's ``output_expires_after``: how long after their creation the output and error files are kept
    (the anchor is each file's creation, not the batch's; ``afina.core.file_expiry``)."""


class BatchProgress(BaseModel):
    """What the worker has finished: ``lines_done`` input lines, their counts, the tokens the answered ones used,
    and when phases began (``expired_at``: the batch ran past its completion window and stopped there)."""

    model_config = ConfigDict(extra="forbid")

    lines_done: int = 0
    total: int = 0
    completed: int = 0
    failed: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    cancelling_at: int | None = None
    expired_at: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None


class BatchSpec(BaseModel):
    """A batch's request and progress (its job row's ``method["batch"]``)."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    key_prefix: str = Field("", description="the API key that created it: its requests are that key's")
    output_expires_after: OutputExpiresAfter | None = None
    progress: BatchProgress = Field(default_factory=BatchProgress)

    @classmethod
    def of_job(cls, job: Job) -> BatchSpec:
        return cls.model_validate((job.method or {}).get(BATCH_KIND) or {})

    def method(self) -> dict:
        return {"type": BATCH_KIND, BATCH_KIND: self.model_dump(mode="json")}

    def expires_at(self, created_at: int) -> int:
        """When a batch created at ``created_at`` expires (OpenAI's ``expires_at``)."""
        return created_at + COMPLETION_WINDOW_S[self.completion_window]


def batch_id() -> str:
    return ids.new_id("batch_")


def batch_prefix(tenant_id: str, batch: str) -> str:
    """Where a batch keeps its partial answers in the store (tenant first, like every key)."""
    return f"batches/{tenant_id}/{batch}"
