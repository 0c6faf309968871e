"""Captured exchanges, callable without HTTP: keeping one, listing them, their JSONL, feedback, retraining.

``capture_exchange`` is what the gateway's ``CaptureObserver`` runs (in a worker thread) for every
answered chat of a route: the route's ``capture`` settings decide whether it is kept and what is
redacted. Everything else here reads or writes the tenant's own exchanges only: another tenant's
route or completion id answers exactly like a missing one (404).
"""

from __future__ import annotations

from typing import Any

from afina.core.db import repository as repo
from afina.core.errors import NotFound
from afina.core.redaction import REDACTION_KINDS, RedactionKind, redact
from afina.core.routing import RouteCapture, RouteSpec
from afina.core.runtime import Runtime
from afina.gateway.captures import dataset, retrain
from afina.gateway.captures.protocol import (
    COMPLETION_ID_PREFIX,
    CapturedExchangeObject,
    CaptureList,
    FeedbackRequest,
)
from afina.gateway.fine_tuning.protocol import FineTuningJob
from afina.gateway.serving.exchange import Exchange


def redacted_messages(messages: list[dict[str, Any]], kinds: list[RedactionKind]) -> list[dict[str, Any]]:
    """Role and content of each message (what a training example holds), the content redacted."""
    return [{"role": str(message.get("role")), "content": redact(str(message.get("content") or ""), kinds)}
            for message in messages]


def capture_exchange(runtime: Runtime, exchange: Exchange) -> RouteCapture | None:
    """Keep ``exchange`` if its route captured chats when it was planned (``Plan.capture``, as the route said
    then); the capture settings when that makes a retraining due (``retrain_after`` unused exchanges or more),
    None otherwise."""
    name, capture = exchange.plan.route, exchange.plan.capture
    request, generation = exchange.request, exchange.generation
    if name is None or capture is None or request is None or request.messages is None or generation is None:
        return None
    tenant_id = exchange.caller.tenant_id
    with runtime.db.session() as session:
        added = repo.add_captured_exchange(
            session, exchange_id=exchange.id, tenant_id=tenant_id, route=name, target=exchange.target,
            model=exchange.model, messages=redacted_messages(request.messages, capture.redact),
            answer=redact(generation.text, capture.redact), finish_reason=generation.finish_reason)
        if added is None or capture.retrain_after is None:
            return None
        session.flush()
        unused = repo.count_unused_captures(session, tenant_id, name)
    return capture if unused >= capture.retrain_after else None


def _check_route(runtime: Runtime, tenant_id: str, name: str) -> None:
    """404 unless the tenant has this route, or exchanges kept under its name (a route deleted since)."""
    with runtime.db.session() as session:
        if repo.get_route(session, tenant_id, name) is None and not repo.has_captured_exchanges(session, tenant_id,
                                                                                                  name):
            raise retrain.route_not_found(name)


def list_captures(runtime: Runtime, tenant_id: str, name: str, after: str | None, limit: int) -> CaptureList:
    _check_route(runtime, tenant_id, name)
    with runtime.db.session() as session:
        rows, has_more = repo.list_captured_exchanges(session, tenant_id, name, after, limit)
        data = [CapturedExchangeObject.from_row(row) for row in rows]
    return CaptureList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


def captures_jsonl(runtime: Runtime, tenant_id: str, name: str, *, unused_only: bool = False,
                   include_feedback: dataset.IncludeFeedback | None = None) -> bytes:
    """The route's captured exchanges as OpenAI chat JSONL, oldest first, filtered by ``include_feedback``
    (default: the route's setting); ``unused_only``: only those no job trained on yet."""
    _check_route(runtime, tenant_id, name)
    with runtime.db.session() as session:
        row = repo.get_route(session, tenant_id, name)
        capture = (RouteSpec.from_row(row.spec).capture if row is not None else None) or RouteCapture()
        rows = repo.captured_exchanges_for_dataset(session, tenant_id, name, unused_only=unused_only)
        content, _examples = dataset.chat_jsonl(rows, include_feedback or capture.include_feedback)
    return content


def exchange_id_of(completion_id: str) -> str:
    """The exchange's id in a completion id (``chatcmpl-<id>``, or the bare id)."""
    return completion_id.removeprefix(COMPLETION_ID_PREFIX)


def post_feedback(runtime: Runtime, tenant_id: str, completion_id: str,
                  body: FeedbackRequest) -> CapturedExchangeObject:
    """Store a rating (and correction, redacted as the route redacts) with one of the tenant's kept exchanges."""
    exchange_id = exchange_id_of(completion_id)
    with runtime.db.session() as session:
        row = repo.get_captured_exchange(session, tenant_id, exchange_id)
        if row is None:
            raise NotFound(f"No captured exchange for the completion '{completion_id}' (only chats of a route with "
                           "capture on are kept).", param="completion_id", code="completion_not_found")
        route = repo.get_route(session, tenant_id, row.route)
        capture = RouteSpec.from_row(route.spec).capture if route is not None else None
        kinds = capture.redact if capture is not None else list(REDACTION_KINDS)
        correction = redact(body.correction, kinds) if body.correction is not None else None
        updated = repo.set_capture_feedback(session, tenant_id, exchange_id, body.rating, correction)
        return CapturedExchangeObject.from_row(updated)


def retrain_now(runtime: Runtime, tenant_id: str, name: str) -> FineTuningJob:
    """An operator's retraining: a job on every unused exchange of the route, whatever ``retrain_after`` says."""
    job = retrain.start_retraining(runtime, tenant_id, name)
    assert job is not None  # without a threshold, nothing to train on is a Conflict
    return job
