"""Make the exported model visible: one registry row and a succeeded job, in one transaction.

The row and the job status change together or not at all, so a crash between
them can never leave a succeeded job without a model or a model whose job still
runs. ``register_model`` updates the row of a job registered before, so running
the stage twice still gives exactly one model per job.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.core.artifacts import FileEntry, HubPublication, OllamaRegistration, ServedArtifacts
from afina.core.db import repository as repo
from afina.core.db.models import Job, Model, OutboxMessage
from afina.core.errors import ExportFailed
from afina.core.evaluation_jobs import add_evaluation_job
from afina.core.naming import fine_tuned_model_name
from afina.core.queue import outbox
from afina.core.queue.jobs import JobContext


def register_export(context: JobContext, served: ServedArtifacts, message: str, *,
                    publish_after_gate: bool = False, result_files: list[FileEntry] | None = None) -> str:
    """Register the job's model, set ``fine_tuned_model``, add the export's ``result_files`` (``verification.json``,
    the report pages it rewrote) to the job's, queue its evaluation (``AFINA_EVALUATION_ENABLED``) and mark the
    job succeeded; returns the model name.

    Fenced by the lease: an exporter that stalled and lost the job to another registers nothing.
    ``publish_after_gate``: publishing waits for the evaluation's quality gate, which queues it on a pass.
    """
    messages: list[OutboxMessage] = []

    def register(session: Session, job: Job) -> str:
        messages.clear()  # a retried transaction starts over
        name = fine_tuned_model_name(job.model, job.tenant_id, job.suffix, job.id)
        repo.register_model(session, name=name, tenant_id=job.tenant_id, base_model=job.model, job_id=job.id,
                            artifacts=served.model_dump(mode="json"))
        job.fine_tuned_model = name
        add_result_files(session, job, result_files or [])
        if context.runtime.settings.evaluation_enabled:
            evaluation = add_evaluation_job(session, job, name, publish_on_pass=publish_after_gate)
            messages.extend([evaluation] if evaluation is not None else [])
        if job.status != "succeeded":
            repo.set_status(session, job, "succeeded", message=message)
        return name

    name = context.write(register, "model registration")
    outbox.deliver(context.runtime, messages)
    return name


def finish_registered(context: JobContext) -> str | None:
    """When the job's model is already registered, make sure the job says so; the model's name, or None."""
    def finish(session: Session, job: Job) -> str | None:
        if repo.count_models_for_job(session, job.id) == 0:
            return None
        name = session.scalars(select(Model.name).where(Model.job_id == job.id)).one()
        job.fine_tuned_model = name
        if job.status not in repo.TERMINAL_STATUSES:
            repo.set_status(session, job, "succeeded", message=f"Model {name} is already registered")
        return name

    return context.write(finish, "model registration check")


def update_registration(context: JobContext, model_name: str, served: ServedArtifacts, *,
                        result_files: list[FileEntry] | None = None) -> None:
    """A re-export: point the model's row at the new files and refresh the fine-tuning job's result files (its
    report and ``verification.json``), together; the export job succeeds once its publications are done."""
    def update(session: Session, job: Job) -> None:
        model = session.get(Model, model_name)
        if model is None or model.tenant_id != job.tenant_id:
            raise ExportFailed(f"model {model_name} was deleted while it was being exported")
        model.artifacts = served.model_dump(mode="json")
        if model.job_id is not None:
            source = session.get(Job, model.job_id)
            if source is not None:
                add_result_files(session, source, result_files or [])
        job.fine_tuned_model = model_name

    context.write(update, "model re-registration")


def record_publication(context: JobContext, model_name: str, *, ollama: OllamaRegistration | None = None,
                       hub: HubPublication | None = None) -> None:
    """Keep what a publication did on the model's row (the model stays usable whatever it says)."""
    def record(session: Session, job: Job) -> None:
        model = session.get(Model, model_name)
        if model is None or model.tenant_id != job.tenant_id:
            return
        if ollama is not None:
            model.ollama = ollama.model_dump(mode="json")
        if hub is not None:
            model.hub = hub.model_dump(mode="json")

    context.write(record, "publication record")


def add_result_files(session: Session, job: Job, entries: list[FileEntry]) -> None:
    """Expose ``entries`` as files of the job (``result_files``, downloadable with ``GET /v1/files/{id}/content``);
    an object registered before keeps its file id, with its new size and sha256."""
    ids = [repo.add_result_file(session, job.tenant_id, object_key=entry.key, filename=entry.key.rsplit("/", 1)[-1],
                                size=entry.bytes, sha256=entry.sha256).id for entry in entries]
    session.flush()
    known = list(job.result_files or [])
    job.result_files = [*known, *(file_id for file_id in ids if file_id not in known)]


def record_result_files(context: JobContext, job_id: str, entries: list[FileEntry]) -> None:
    """Add ``entries`` to the result files of ``job_id`` (the job this stage runs, or a re-export's source job)
    on their own, as a failed export does for its report and ``verification.json``."""
    def record(session: Session, job: Job) -> None:
        row = job if job.id == job_id else session.get(Job, job_id)
        if row is not None:
            add_result_files(session, row, entries)

    context.write(record, "result files")
