"""Batch logic, callable without HTTP: create (check the input file, queue the ``batch`` stage), read, list,
cancel, and a batch's job row in OpenAI's ``Batch`` shape."""

from __future__ import annotations

from sqlalchemy.orm import Session

from afina.core.batches import BATCH_INPUT_PURPOSE, BATCH_KIND, BATCH_STAGE, BatchSpec, batch_id
from afina.core.db import repository as repo
from afina.core.db.models import Job, now
from afina.core.errors import InvalidRequest, NotFound
from afina.core.keys import KeyGrant
from afina.core.queue import outbox
from afina.core.runtime import Runtime
from afina.gateway.batches.protocol import (
    Batch,
    BatchCreateRequest,
    BatchError,
    BatchErrors,
    BatchList,
    BatchUsage,
    RequestCounts,
)
from afina.gateway.params import check_no_nul

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata holds at most {MAX_METADATA_PAIRS} pairs; got {len(metadata)}",
                             param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                                 f"{MAX_METADATA_VALUE}; {key[:64]!r} is longer", param="metadata")


def create_batch(runtime: Runtime, caller: KeyGrant, body: BatchCreateRequest) -> Batch:
    """Queue a batch of the caller's input file; its lines are checked by the worker, one by one (a bad line
    goes to the error file, the rest run)."""
    _check_metadata(body.metadata)
    with runtime.db.session() as session:
        input_file = repo.get_file(session, caller.tenant_id, body.input_file_id)
        if input_file.purpose != BATCH_INPUT_PURPOSE:
            raise InvalidRequest(f"input_file_id {body.input_file_id} was uploaded with purpose "
                                 f"{input_file.purpose!r}; upload the requests with purpose 'batch'",
                                 param="input_file_id")
        spec = BatchSpec(endpoint=body.endpoint, input_file_id=input_file.id,
                         completion_window=body.completion_window, key_prefix=caller.prefix,
                         output_expires_after=body.output_expires_after)
        job = Job(id=batch_id(), tenant_id=caller.tenant_id, model=body.endpoint, training_file=input_file.id, seed=0,
                  hyperparameters={}, method=spec.method(), kind=BATCH_KIND, status="queued", stage=BATCH_STAGE,
                  user_metadata=body.metadata)
        session.add(job)
        session.flush()
        repo.add_event(session, job.id, f"Batch of {input_file.id} for {body.endpoint} queued")
        message = outbox.add_stage(session, BATCH_STAGE, job.id)
        batch = to_batch(job)
    outbox.deliver(runtime, [message])  # a broker outage only delays it: the relay sends it later
    return batch


def _batch_row(session: Session, tenant_id: str, batch: str) -> Job:
    check_no_nul("batch_id", batch)
    job: Job | None
    try:
        job = repo.get_job(session, tenant_id, batch)
    except NotFound:
        job = None
    if job is None or job.kind != BATCH_KIND:
        raise NotFound(f"no such batch: {batch}", param="batch_id")
    return job


def get_batch(runtime: Runtime, tenant_id: str, batch: str) -> Batch:
    with runtime.db.session() as session:
        return to_batch(_batch_row(session, tenant_id, batch))


def list_batches(runtime: Runtime, tenant_id: str, after: str | None, limit: int) -> BatchList:
    check_no_nul("after", after)
    with runtime.db.session() as session:
        if after:
            _batch_row(session, tenant_id, after)  # another tenant's id answers like a missing one
        rows, has_more = repo.list_jobs(session, tenant_id, after, limit, kind=BATCH_KIND)
        data = [to_batch(row) for row in rows]
    return BatchList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


def cancel_batch(runtime: Runtime, tenant_id: str, batch: str) -> Batch:
    """``cancelling`` while a worker runs it (it stops between requests and keeps what finished), ``cancelled``
    at once when none holds it."""
    with runtime.db.session() as session:
        _batch_row(session, tenant_id, batch)
        job = repo.request_cancel(session, tenant_id, batch)
        if job.status not in repo.TERMINAL_STATUSES:
            spec = BatchSpec.of_job(job)
            spec.progress.cancelling_at = now()
            job.method = spec.method()
        session.flush()
        return to_batch(job)


def _status(job: Job, spec: BatchSpec) -> str:
    if job.status == "succeeded":
        return "completed"
    if job.status == "cancelled" and spec.progress.expired_at is not None:
        return "expired"  # it ran past its completion window: stopped there, like a cancel, keeping what finished
    if job.status in ("failed", "cancelled"):
        return job.status
    if job.cancel_requested:
        return "cancelling"
    if spec.progress.finalizing_at is not None:
        return "finalizing"
    return "in_progress" if job.status == "running" else "validating"


def to_batch(job: Job) -> Batch:
    """A batch job's row as OpenAI's ``Batch``."""
    spec = BatchSpec.of_job(job)
    progress = spec.progress
    status = _status(job, spec)
    errors = None
    if job.error:
        errors = BatchErrors(data=[BatchError(code=job.error.get("code"), message=job.error.get("message"),
                                              param=job.error.get("param"))])
    finished = job.finished_at
    return Batch(id=job.id, endpoint=spec.endpoint, errors=errors, input_file_id=spec.input_file_id,
                 completion_window=spec.completion_window, status=status,  # type: ignore[arg-type]
                 output_file_id=progress.output_file_id, error_file_id=progress.error_file_id,
                 created_at=job.created_at, in_progress_at=progress.in_progress_at,
                 expires_at=spec.expires_at(job.created_at), finalizing_at=progress.finalizing_at,
                 completed_at=finished if status == "completed" else None,
                 failed_at=finished if status == "failed" else None, expired_at=progress.expired_at,
                 cancelling_at=progress.cancelling_at, cancelled_at=finished if status == "cancelled" else None,
                 request_counts=RequestCounts(total=progress.total, completed=progress.completed,
                                              failed=progress.failed),
                 usage=BatchUsage(input_tokens=progress.prompt_tokens, output_tokens=progress.completion_tokens,
                                  total_tokens=progress.prompt_tokens + progress.completion_tokens),
                 metadata=job.user_metadata)
