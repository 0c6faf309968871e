"""HTTP routes of ``/v1/models`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter

from afina.gateway.deps import RuntimeDep, TenantDep
from afina.gateway.models import service
from afina.gateway.models.protocol import ModelList, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(runtime: RuntimeDep, tenant: TenantDep) -> ModelList:
    return service.list_models(runtime, tenant)


@router.get("/{model:path}")
def retrieve_model(model: str, runtime: RuntimeDep, tenant: TenantDep) -> ModelObject:
    """``{model:path}``: aliases such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` contain a slash."""
    return service.get_model(runtime, tenant, model)
