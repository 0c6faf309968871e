"""HTTP routes of ``/v1/models`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from afina.gateway.deps import RuntimeDep, TenantDep
from afina.gateway.error_protocol import error_responses
from afina.gateway.models import service
from afina.gateway.models.protocol import ModelList, ModelObject
from afina.gateway.params import refuse_nul_params

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(refuse_nul_params)])


@router.get("", responses=error_responses())
def list_models(runtime: RuntimeDep, tenant: TenantDep) -> ModelList:
    return service.list_models(runtime, tenant)


@router.get("/{model:path}", responses=error_responses(404))
def retrieve_model(model: str, runtime: RuntimeDep, tenant: TenantDep) -> ModelObject:
    """``{model:path}``: aliases such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` contain a slash."""
    return service.get_model(runtime, tenant, model)
