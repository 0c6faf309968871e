"""HTTP routes of capture for retraining (the logic is in ``service``): a route's kept exchanges, their JSONL and
a retraining now (admin), and feedback on a chat completion (inference, as the app that chats sends it).

Declared before ``routes.router``: its ``/v1/routes/{name}`` takes every character, these paths too."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from afina.gateway.captures import service
from afina.gateway.captures.protocol import CapturedExchangeObject, CaptureList, FeedbackRequest
from afina.gateway.captures.retrain import suffix_for
from afina.gateway.deps import RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import TEXT, content, error_responses
from afina.gateway.fine_tuning.protocol import FineTuningJob
from afina.gateway.params import MODEL_NAME_PATH, refuse_nul_params

router = APIRouter(tags=["routes"], dependencies=[Depends(refuse_nul_params)])
ROUTE = f"/v1/routes/{{name:{MODEL_NAME_PATH}}}"  # a route's name may hold a slash, as model names do
ADMIN = [Depends(require("admin"))]
Limit = Annotated[int, Query(ge=1, le=100)]
JSONL = "application/x-ndjson"


@router.get(f"{ROUTE}/captures", dependencies=ADMIN, responses=error_responses(404))
def list_captures(name: str, runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
                  limit: Limit = 20) -> CaptureList:
    """The route's captured exchanges, newest first, redacted as they were stored."""
    return service.list_captures(runtime, tenant, name, after, limit)


@router.get(f"{ROUTE}/captures/content", dependencies=ADMIN, response_class=Response,
            responses={**error_responses(404), **content({JSONL: TEXT}, "OpenAI chat JSONL, one example a line.")})
def captures_content(name: str, runtime: RuntimeDep, tenant: TenantDep, unused: bool = False,
                     include_feedback: Literal["all", "positive"] | None = None) -> Response:
    """The captured exchanges as a fine-tuning file (``unused=true``: only those no job trained on yet;
    ``include_feedback`` overrides the route's setting)."""
    body = service.captures_jsonl(runtime, tenant, name, unused_only=unused, include_feedback=include_feedback)
    filename = quote(f"{suffix_for(name)}-captured.jsonl")
    return Response(body, media_type=JSONL, headers={"Content-Disposition": f"attachment; filename*=UTF-8''{filename}"})


@router.post(f"{ROUTE}/retrain", dependencies=ADMIN, responses=error_responses(404, 409))
def retrain(name: str, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    """Start the route's retraining job now, on every captured exchange no job used yet (the route is unchanged:
    point it at the new model once the job succeeded)."""
    return service.retrain_now(runtime, tenant, name)


@router.post("/v1/chat/completions/{completion_id}/feedback", tags=["chat"],
             dependencies=[Depends(require("inference"))], responses=error_responses(404))
def post_feedback(completion_id: str, body: FeedbackRequest, runtime: RuntimeDep,
                  tenant: TenantDep) -> CapturedExchangeObject:
    """A thumbs up or down, and optionally a correction, for a chat completion of a route with capture on
    (``chatcmpl-…`` or the bare id); posting again replaces it."""
    return service.post_feedback(runtime, tenant, completion_id, body)
