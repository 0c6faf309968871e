"""HTTP routes of ``/v1/batches`` (the logic is in ``service``; the worker in ``runner``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from afina.gateway.batches import service
from afina.gateway.batches.protocol import Batch, BatchCreateRequest, BatchList
from afina.gateway.deps import CallerDep, RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import error_responses
from afina.gateway.params import refuse_nul_params

router = APIRouter(prefix="/v1/batches", tags=["batches"],
                   dependencies=[Depends(refuse_nul_params), Depends(require("inference"))])


@router.post("", responses=error_responses(400, 404))
def create_batch(body: BatchCreateRequest, runtime: RuntimeDep, caller: CallerDep) -> Batch:
    """Queue the requests of an uploaded ``purpose=batch`` file; answers ``validating`` at once."""
    return service.create_batch(runtime, caller, body)


@router.get("", responses=error_responses(404))
def list_batches(runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
                 limit: int = Query(20, ge=1, le=100)) -> BatchList:
    return service.list_batches(runtime, tenant, after, limit)


@router.get("/{batch_id}", responses=error_responses(404))
def retrieve_batch(batch_id: str, runtime: RuntimeDep, tenant: TenantDep) -> Batch:
    return service.get_batch(runtime, tenant, batch_id)


@router.post("/{batch_id}/cancel", responses=error_responses(404, 409))
def cancel_batch(batch_id: str, runtime: RuntimeDep, tenant: TenantDep) -> Batch:
    """Stops between requests; what finished stays in the output and error files."""
    return service.cancel_batch(runtime, tenant, batch_id)
