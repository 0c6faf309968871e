"""Captured exchanges and feedback as the API shows them (an afina extension beside OpenAI's API)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.db.models import CapturedExchange
from afina.core.db.repository import CLAIM_PREFIX
from afina.gateway.params import NulFreeStr

COMPLETION_ID_PREFIX = "chatcmpl-"  # an OpenAI chat completion's id is this and the exchange's id
MAX_CORRECTION_CHARS = 200_000


class CapturedExchangeObject(BaseModel):
    """One kept exchange, redacted as it was stored; ``correction`` replaces ``answer`` in training data."""

    object: Literal["route.captured_exchange"] = "route.captured_exchange"
    id: str
    completion_id: str = Field(description="the chat completion's id (feedback names it)")
    route: str
    created_at: int
    target: str = Field(description="the route target that answered")
    model: str = Field(description="the model that answered")
    messages: list[dict[str, Any]] = Field(description="the request's messages, the route's system prompt included")
    answer: str
    finish_reason: str
    feedback: Literal["up", "down"] | None = None
    correction: str | None = None
    used_in_job: str | None = Field(None, description="the fine-tuning job that trained on it")

    @classmethod
    def from_row(cls, row: CapturedExchange) -> CapturedExchangeObject:
        used = row.used_in_job if row.used_in_job and not row.used_in_job.startswith(CLAIM_PREFIX) else None
        return cls(id=row.id, completion_id=COMPLETION_ID_PREFIX + row.id, route=row.route,
                   created_at=row.created_at, target=row.target, model=row.model, messages=list(row.messages),
                   answer=row.answer, finish_reason=row.finish_reason,
                   feedback=row.feedback if row.feedback in ("up", "down") else None,  # type: ignore[arg-type]
                   correction=row.correction, used_in_job=used)


class CaptureList(BaseModel):
    """A page, newest first; ``after=<last_id>`` fetches the next while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[CapturedExchangeObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FeedbackRequest(BaseModel):
    """``POST /v1/chat/completions/{completion_id}/feedback``: a rating, and optionally the answer it should
    have been (redacted like the exchange before it is stored). Posting again replaces it."""

    model_config = ConfigDict(extra="forbid")

    rating: Literal["up", "down"]
    correction: Annotated[NulFreeStr, Field(min_length=1, max_length=MAX_CORRECTION_CHARS)] | None = Field(
        None, description="replaces the answer in the retraining data")
