"""Fine-tuning job logic, callable without HTTP.

Creating a job writes its row, first events and its ``ingest`` message (to the outbox)
in one transaction, then hands the message to the broker: a worker never sees a job id
the database does not know, and a crash or a broker outage after the commit only
delays the job (the workers' outbox relay sends the message), it never strands it.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from afina.core import ids
from afina.core.catalog import resolve_base_model
from afina.core.catalog.access import check_store_access
from afina.core.catalog.resolved import ResolvedBaseModel
from afina.core.db import repository as repo
from afina.core.db.models import Checkpoint, Job, JobEvent
from afina.core.errors import InvalidRequest, NotFound
from afina.core.gpu_classes import check_job_placement
from afina.core.logging import log_event
from afina.core.naming import checkpoint_model_name, fine_tuned_model_name
from afina.core.queue import outbox
from afina.core.runtime import Runtime
from afina.core.training import check_max_seq_len
from afina.core.training.lifecycle import display_hyperparameters
from afina.gateway.fine_tuning.protocol import (
    CreateJobRequest,
    FineTuningJob,
    JobCheckpoint,
    JobError,
    Page,
)
from afina.gateway.fine_tuning.protocol import JobEvent as JobEventObject
from afina.gateway.models.exports import check_export_options, stored_options

log = logging.getLogger("afina.gateway")
SHARED_BASE_MODELS_PREFIX = "base-models/"


def _check_model_access(model: str, tenant_id: str) -> None:
    """A ``store://`` base model is the tenant's own (``models/<tenant>/``) or an operator's (``base-models/``);
    a local path is checked against ``settings.allowed_model_dirs`` where ``create_job`` resolves it."""
    check_store_access(model, tenant_id)


def _check_file(session: Any, tenant_id: str, file_id: str, param: str) -> None:
    """OpenAI answers 400 naming the parameter for a file that is missing (or another tenant's)."""
    try:
        row = repo.get_file(session, tenant_id, file_id)
    except NotFound:
        raise InvalidRequest(f"invalid {param}: {file_id} does not exist", param=param,
                             code="invalid_file") from None
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"invalid {param}: {file_id} has purpose {row.purpose!r}, not 'fine-tune'",
                             param=param, code="invalid_file")
    if row.status == "error":  # ingest already refused it: say why now, not in a failed job later
        raise InvalidRequest(f"invalid {param}: {file_id} failed ingest: {row.status_details} "
                             f"(GET /v1/files/{file_id}/ingest/report lists every problem)", param=param,
                             code="invalid_file")


def _fine_tuned_parent(runtime: Runtime, tenant_id: str, model: str) -> Any:
    """The tenant's fine-tuned model a job continues from (OpenAI: ``model`` may be an ``ft:`` model), or None."""
    if not model.startswith("ft:"):
        return None
    with runtime.db.session() as session:
        parent = repo.get_model(session, tenant_id, model)
    if parent is None:
        raise InvalidRequest(f"model {model!r} is not one of your fine-tuned models; GET /v1/models lists them",
                             param="model", code="model_not_found")
    return parent


def _method(parent: Any) -> dict[str, Any]:
    """The stored ``method``: its type, and the adapter a continued job starts from (hyperparameters are
    stored once, in ``job.hyperparameters``)."""
    if parent is None:
        return {"type": "supervised"}
    # the trainer starts from this job's LoRA adapter instead of a fresh one
    return {"type": "supervised", "supervised": {"init_from": {"model": parent.name, "job_id": parent.job_id}}}


def create_job(runtime: Runtime, tenant_id: str, request: CreateJobRequest) -> FineTuningJob:
    """Check everything the request says (model, hyperparameters, files) before a row is written."""
    training = request.training_spec()
    check_export_options(runtime.settings, tenant_id, request.export)
    check_job_placement(runtime.settings, training.gpu_class, training.num_gpus)
    _check_model_access(request.model, tenant_id)  # before the store is read for the model's files
    parent = _fine_tuned_parent(runtime, tenant_id, request.model)
    base_model = parent.base_model if parent is not None else request.model
    spec = resolve_base_model(base_model, chat_family=training.chat_family, store=runtime.store,
                              allowed_model_dirs=runtime.settings.allowed_model_dirs)
    check_max_seq_len(training.max_seq_len, spec.context_length)
    seed = request.job_seed(training)
    if seed is None:
        seed = secrets.randbelow(2**31)
    with runtime.db.session() as session:
        _check_file(session, tenant_id, request.training_file, "training_file")
        if request.validation_file:
            _check_file(session, tenant_id, request.validation_file, "validation_file")
        job = Job(id=ids.job_id(), tenant_id=tenant_id, model=spec.id,
                  base_model=ResolvedBaseModel.of(spec).model_dump(mode="json"),
                  training_file=request.training_file, validation_file=request.validation_file,
                  suffix=request.suffix, seed=seed, hyperparameters=training.requested(), method=_method(parent),
                  export_options=stored_options(request.export),
                  user_metadata=request.metadata, status="validating_files", stage="ingest",
                  gpu_class=training.gpu_class, num_gpus=training.num_gpus)
        session.add(job)
        session.flush()
        repo.add_event(session, job.id, f"Created fine-tuning job: {job.id}")
        repo.add_event(session, job.id, f"Validating training file: {request.training_file}")
        message = outbox.add_stage(session, "ingest", job.id)
    outbox.deliver(runtime, [message])
    log_event(log, "job.created", job_id=job.id, tenant=tenant_id, model=spec.id)
    return job_object(job)


def job_object(job: Job) -> FineTuningJob:
    hyperparameters = display_hyperparameters(job)
    method = dict(job.method or {"type": "supervised"})
    method[method["type"]] = {**(method.get(method["type"]) or {}), "hyperparameters": hyperparameters}
    error = None
    if job.error:
        error = JobError(code=str(job.error.get("code") or "error"), message=str(job.error.get("message") or ""),
                         param=job.error.get("param"))
    return FineTuningJob(
        id=job.id, created_at=job.created_at, finished_at=job.finished_at, model=job.model,
        fine_tuned_model=job.fine_tuned_model, organization_id=job.tenant_id, status=job.status, error=error,
        hyperparameters=hyperparameters, training_file=job.training_file, validation_file=job.validation_file,
        result_files=list(job.result_files or []), trained_tokens=job.trained_tokens, seed=job.seed,
        estimated_finish=job.estimated_finish, metadata=job.user_metadata, method=method,
        user_provided_suffix=job.suffix,
    )


def get_job(runtime: Runtime, tenant_id: str, job_id: str) -> FineTuningJob:
    with runtime.db.session() as session:
        return job_object(repo.get_job(session, tenant_id, job_id))


def list_jobs(runtime: Runtime, tenant_id: str, after: str | None, limit: int) -> Page[FineTuningJob]:
    with runtime.db.session() as session:
        rows, has_more = repo.list_jobs(session, tenant_id, after, limit)
        return _page([job_object(row) for row in rows], has_more)


def cancel_job(runtime: Runtime, tenant_id: str, job_id: str) -> FineTuningJob:
    """Cancelled at once when no worker holds the job; otherwise the worker stops at its next step."""
    with runtime.db.session() as session:
        job = repo.request_cancel(session, tenant_id, job_id)
    return job_object(job)


def event_object(event: JobEvent) -> JobEventObject:
    return JobEventObject(id=event.id, created_at=event.created_at, level=event.level, message=event.message,
                          type=event.type, data=event.data)


def list_events(runtime: Runtime, tenant_id: str, job_id: str, after: str | None,
                limit: int) -> Page[JobEventObject]:
    with runtime.db.session() as session:
        repo.get_job(session, tenant_id, job_id)
        rows, has_more = repo.list_events(session, job_id, after, limit)
        return _page([event_object(row) for row in rows], has_more)


def checkpoint_object(job: Job, checkpoint: Checkpoint) -> JobCheckpoint:
    model_name = job.fine_tuned_model or fine_tuned_model_name(job.model, job.tenant_id, job.suffix, job.id)
    return JobCheckpoint(id=checkpoint.id, created_at=checkpoint.created_at,
                         fine_tuned_model_checkpoint=checkpoint_model_name(model_name, checkpoint.step_number),
                         fine_tuning_job_id=job.id, step_number=checkpoint.step_number,
                         metrics={"step": checkpoint.step_number, **(checkpoint.metrics or {})})


def list_checkpoints(runtime: Runtime, tenant_id: str, job_id: str, after: str | None,
                     limit: int) -> Page[JobCheckpoint]:
    with runtime.db.session() as session:
        job = repo.get_job(session, tenant_id, job_id)
        rows, has_more = repo.list_checkpoints(session, job_id, after, limit)
        return _page([checkpoint_object(job, row) for row in rows], has_more)


def _page(items: list[Any], has_more: bool) -> Page[Any]:
    return Page(data=items, has_more=has_more, first_id=items[0].id if items else None,
                last_id=items[-1].id if items else None)
