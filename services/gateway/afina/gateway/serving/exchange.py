"""A finished exchange, and the observers that learn of each: token accounting for rate limits, metrics,
capture for retraining. The dispatcher tells them once per answered generation or embedding, after the
answer is complete (a stream: after its last piece); an observer's failure is logged, never the caller's."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from afina.core.keys import KeyGrant
from afina.core.logging import log_event
from afina.gateway.inference.base import Generation, GenerationRequest
from afina.gateway.serving.resolve import Plan

log = logging.getLogger("afina.gateway.serving")


def new_exchange_id() -> str:
    return secrets.token_hex(12)


@dataclass
class Exchange:
    """One answered call: who asked (``caller``), what (``request``; None for embeddings), which target
    answered (``target``, ``model``), what it cost and how long it took."""

    id: str
    caller: KeyGrant
    plan: Plan
    target: str  # the route target's label (or the model's name)
    model: str  # what the backend served
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from the call's start to its last byte
    first_piece_seconds: float | None = None  # streams: time to the first piece
    request: GenerationRequest | None = None
    generation: Generation | None = None
    stream: bool = False
    labels: dict[str, str] = field(default_factory=dict)


Observer = Callable[[Exchange], Awaitable[None]]


async def tell(observers: list[Observer], exchange: Exchange) -> None:
    for observer in observers:
        try:
            await observer(exchange)
        except Exception as exc:  # noqa: BLE001 - an observer never breaks an answer already given
            log_event(log, "exchange.observer_failed", logging.WARNING, observer=getattr(observer, "__name__", "?"),
                      error=type(exc).__name__, exchange=exchange.id)
