"""HTTP route of ``/v1/embeddings`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from afina.gateway.deps import DispatcherDep, EndUserDep, TenantDep
from afina.gateway.embeddings import service
from afina.gateway.embeddings.protocol import EmbeddingList, EmbeddingRequest
from afina.gateway.error_protocol import error_responses
from afina.gateway.params import refuse_nul_params
from afina.gateway.serving.headers import target_headers

router = APIRouter(prefix="/v1", tags=["embeddings"], dependencies=[Depends(refuse_nul_params)])


@router.post("/embeddings", response_model=EmbeddingList, responses=error_responses(404, 429, 502, 504))
async def create_embeddings(body: EmbeddingRequest, tenant: TenantDep, dispatcher: DispatcherDep,
                            end_user: EndUserDep) -> JSONResponse:
    plan = await dispatcher.plan(tenant, body.model, end_user or body.user)
    embeddings, answered = await service.embed(dispatcher, tenant, plan, body)
    return JSONResponse(embeddings.model_dump(mode="json"), headers=target_headers(answered))
