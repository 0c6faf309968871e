"""HTTP route of ``/v1/embeddings`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from afina.gateway.deps import CallerDep, DispatcherDep, EndUserDep, rate_limited, require
from afina.gateway.embeddings import service
from afina.gateway.embeddings.protocol import EmbeddingList, EmbeddingRequest
from afina.gateway.error_protocol import error_responses
from afina.gateway.params import refuse_nul_params
from afina.gateway.serving.headers import target_headers

router = APIRouter(prefix="/v1", tags=["embeddings"],
                   dependencies=[Depends(refuse_nul_params), Depends(require("inference")), Depends(rate_limited)])


@router.post("/embeddings", response_model=EmbeddingList, responses=error_responses(404, 429, 502, 504))
async def create_embeddings(body: EmbeddingRequest, caller: CallerDep, dispatcher: DispatcherDep,
                            end_user: EndUserDep) -> JSONResponse:
    plan = await dispatcher.plan(caller.tenant_id, body.model, end_user or body.user)
    embeddings, answered = await service.embed(dispatcher, caller, plan, body)
    return JSONResponse(embeddings.model_dump(mode="json"), headers=target_headers(answered))
