"""HTTP routes of ``/v1/fine_tuning/jobs`` (the logic is in ``service``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from afina.gateway.deps import RuntimeDep, TenantDep
from afina.gateway.fine_tuning import service
from afina.gateway.fine_tuning.protocol import CreateJobRequest, FineTuningJob, JobCheckpoint, JobEvent, Page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine_tuning"])

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("")
def create_job(body: CreateJobRequest, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    return service.create_job(runtime, tenant, body)


@router.get("")
def list_jobs(runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
              limit: Limit = 20) -> Page[FineTuningJob]:
    return service.list_jobs(runtime, tenant, after, limit)


@router.get("/{job_id}")
def retrieve_job(job_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    return service.get_job(runtime, tenant, job_id)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    return service.cancel_job(runtime, tenant, job_id)


@router.get("/{job_id}/events")
def list_events(job_id: str, runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
                limit: Limit = 20) -> Page[JobEvent]:
    return service.list_events(runtime, tenant, job_id, after, limit)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
                     limit: Limit = 10) -> Page[JobCheckpoint]:
    return service.list_checkpoints(runtime, tenant, job_id, after, limit)
