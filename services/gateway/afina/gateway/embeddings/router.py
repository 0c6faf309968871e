"""HTTP route of ``/v1/embeddings`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from afina.gateway.deps import InferenceCallDep
from afina.gateway.embeddings import service
from afina.gateway.embeddings.protocol import EmbeddingList, EmbeddingRequest
from afina.gateway.error_protocol import error_responses
from afina.gateway.serving.headers import target_headers

# NUL refusal, key, scope and rate limit: the route's one dependency (``deps.inference_call``)
router = APIRouter(prefix="/v1", tags=["embeddings"])


@router.post("/embeddings", response_model=EmbeddingList, responses=error_responses(404, 413, 429, 502, 504))
async def create_embeddings(body: EmbeddingRequest, call: InferenceCallDep) -> JSONResponse:
    plan = await call.dispatcher.plan(call.caller.tenant_id, body.model, call.end_user or body.user)
    embeddings, answered = await service.embed(call.dispatcher, call.caller, plan, body)
    return JSONResponse(embeddings.model_dump(mode="json"), headers=target_headers(answered))
