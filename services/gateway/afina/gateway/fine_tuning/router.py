"""HTTP routes of ``/v1/fine_tuning/jobs`` (the logic is in ``service``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from afina.gateway.deps import RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import content, error_responses, sse_event
from afina.gateway.fine_tuning import event_stream, service
from afina.gateway.fine_tuning.protocol import CreateJobRequest, FineTuningJob, JobCheckpoint, JobEvent, Page
from afina.gateway.params import refuse_nul_params

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine_tuning"],
                   dependencies=[Depends(refuse_nul_params), Depends(require("fine-tune"))])

Limit = Annotated[int, Query(ge=1, le=100)]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OF_A_JOB = error_responses(404)  # the job (or the ``after`` anchor) is not this tenant's
# the JSON page comes from the response model; ``stream=true`` answers Server-Sent Events instead
EVENTS_BODY = content({"text/event-stream": sse_event("A fine_tuning.job.event object as JSON (the SSE id is its id), "
                                                       "or `[DONE]` once the job ended and every event was sent.")},
                      "A page of events, or with `stream=true` every event as Server-Sent Events.")


@router.post("", responses=error_responses())
def create_job(body: CreateJobRequest, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    return service.create_job(runtime, tenant, body)


@router.get("", responses=OF_A_JOB)
def list_jobs(runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
              limit: Limit = 20) -> Page[FineTuningJob]:
    return service.list_jobs(runtime, tenant, after, limit)


@router.get("/{job_id}", responses=OF_A_JOB)
def retrieve_job(job_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    return service.get_job(runtime, tenant, job_id)


@router.post("/{job_id}/cancel", responses=error_responses(404, 409))
def cancel_job(job_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FineTuningJob:
    return service.cancel_job(runtime, tenant, job_id)


@router.get("/{job_id}/events", response_model=Page[JobEvent], responses={**OF_A_JOB, **EVENTS_BODY})
def list_events(job_id: str, runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
                limit: Limit = 20, stream: bool = False,
                last_event_id: Annotated[str | None, Header()] = None) -> Page[JobEvent] | StreamingResponse:
    """A page of events, newest first; with ``stream=true``, every event oldest first as Server-Sent Events,
    following the job until it ends (``Last-Event-ID`` resumes after that event)."""
    if not stream:
        return service.list_events(runtime, tenant, job_id, after, limit)
    start = event_stream.open_stream(runtime, tenant, job_id, last_event_id, after=after)
    settings = runtime.settings
    body = event_stream.event_stream(runtime, start, poll_s=settings.events_poll_s,
                                     keepalive_s=settings.events_keepalive_s)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/{job_id}/checkpoints", responses=OF_A_JOB)
def list_checkpoints(job_id: str, runtime: RuntimeDep, tenant: TenantDep, after: str | None = None,
                     limit: Limit = 10) -> Page[JobCheckpoint]:
    return service.list_checkpoints(runtime, tenant, job_id, after, limit)
