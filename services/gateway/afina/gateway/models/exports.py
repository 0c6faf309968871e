"""Export a registered model again, and delete one: the lifecycle of a model after its training job.

A re-export (``POST /v1/models/{model}/exports``) is a job of ``kind="export"`` that runs only the
export stage, over the model's own adapter and files, with its own options and events; it is created
with its queue message in one transaction (the outbox), like a fine-tuning job.
"""

from __future__ import annotations

import logging
from typing import Any

from afina.core import ids
from afina.core.artifacts import ExportOptions
from afina.core.artifacts.export_options import HubTarget
from afina.core.datasets.layout import model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job, Model
from afina.core.errors import InvalidRequest, NotFound, ServiceUnavailable
from afina.core.logging import log_event
from afina.core.queue import outbox
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.models.files import registered_model
from afina.gateway.models.protocol import ModelDeleted, ModelExport, Publication

log = logging.getLogger("afina.gateway")
EXPORT_KIND = "export"
DEFAULT_HUB_TOKEN_ENV = "HF_TOKEN"


def check_export_options(settings: Settings, tenant_id: str, options: ExportOptions | None,
                         param: str = "export") -> None:
    """What a tenant may ask of an export: an Ollama only where one is configured, a Hub token only from an
    environment variable the operator allows it (the token itself never travels in a request)."""
    if options is None:
        return
    if options.ollama not in (None, False) and not settings.ollama_url:
        raise InvalidRequest("this afina has no Ollama to register models in (the operator sets "
                             "AFINA_OLLAMA_URL)", param=f"{param}.ollama")
    if options.hub is not None:
        check_hub_token_env(settings, tenant_id, options.hub, f"{param}.hub.token_env")


def check_hub_token_env(settings: Settings, tenant_id: str, hub: HubTarget, param: str) -> None:
    name = hub.token_env or DEFAULT_HUB_TOKEN_ENV
    if name not in settings.hub_token_envs_for(tenant_id):
        raise InvalidRequest(f"{param} {name!r} is not an environment variable this tenant may use; the operator "
                             "lists them in AFINA_HUB_TOKEN_ENVS", param=param, code="token_env_not_allowed")


def stored_options(options: ExportOptions | None) -> dict[str, Any] | None:
    return None if options is None else options.model_dump(mode="json", exclude_unset=True)


def export_object(job: Job, model: Model | None) -> ModelExport:
    target = (job.method or {}).get("export") or {}
    return ModelExport(id=job.id, model=str(target.get("model", "")), status=job.status, created_at=job.created_at,
                       finished_at=job.finished_at, error=job.error, options=job.export_options or {},
                       published=Publication(ollama=model.ollama if model else None,
                                             hub=model.hub if model else None))


def create_export(runtime: Runtime, tenant_id: str, name: str, options: ExportOptions) -> ModelExport:
    """A tracked re-export of ``name``: its job row, first event and ``export`` message in one transaction."""
    check_export_options(runtime.settings, tenant_id, options, param="body")
    model = registered_model(runtime, tenant_id, name)
    with runtime.db.session() as session:
        source = repo.get_job(session, tenant_id, model.job_id)
        job = Job(id=ids.job_id(), tenant_id=tenant_id, model=source.model, base_model=source.base_model,
                  training_file=source.training_file, suffix=source.suffix, seed=source.seed, hyperparameters={},
                  method={"type": EXPORT_KIND, EXPORT_KIND: {"model": name, "source_job_id": source.id}},
                  kind=EXPORT_KIND, export_options=stored_options(options), status="queued", stage="export")
        session.add(job)
        session.flush()
        repo.add_event(session, job.id, f"Export of {name} queued")
        message = outbox.add_stage(session, "export", job.id)
    outbox.deliver(runtime, [message])
    log_event(log, "export.created", job_id=job.id, tenant=tenant_id, model=name)
    return export_object(job, model)


def _export_job(runtime: Runtime, tenant_id: str, name: str, export_id: str) -> Job:
    with runtime.db.session() as session:
        job = repo.get_job(session, tenant_id, export_id)
    if job.kind != EXPORT_KIND or ((job.method or {}).get(EXPORT_KIND) or {}).get("model") != name:
        raise NotFound(f"model {name} has no export {export_id}", param="export_id")
    return job


def get_export(runtime: Runtime, tenant_id: str, name: str, export_id: str) -> ModelExport:
    job = _export_job(runtime, tenant_id, name, export_id)
    return export_object(job, registered_model(runtime, tenant_id, name))


def export_job_id(runtime: Runtime, tenant_id: str, name: str, export_id: str) -> str:
    """The job id of one of ``name``'s exports (its events are that job's events)."""
    return _export_job(runtime, tenant_id, name, export_id).id


def delete_model(runtime: Runtime, tenant_id: str, name: str) -> ModelDeleted:
    """Remove the model from Ollama (where afina registered it), then from the registry, then its files.

    Ollama first: if it cannot be reached, nothing is deleted and the caller is told to retry (503), so a
    model is never left behind in Ollama after afina forgot it.
    """
    model = registered_model(runtime, tenant_id, name)
    ollama = model.ollama or {}
    if ollama.get("status") == "registered" and runtime.settings.ollama_url:
        _delete_from_ollama(runtime.settings, str(ollama["name"]))
    with runtime.db.session() as session:
        row = repo.get_model(session, tenant_id, name)
        if row is not None:
            session.delete(row)
    runtime.store.delete_prefix(model_prefix(tenant_id, model.job_id) + "/")
    log_event(log, "model.deleted", tenant=tenant_id, model=name)
    return ModelDeleted(id=name)


def _delete_from_ollama(settings: Settings, ollama_name: str) -> None:
    """Ollama's ``DELETE /api/delete``; a model already gone is fine, anything else is a 503 to retry."""
    import httpx
    import ollama

    client = ollama.Client(host=settings.ollama_url, timeout=30)
    try:
        client.delete(ollama_name)
    except ollama.ResponseError as exc:
        if exc.status_code != 404:
            raise ServiceUnavailable(f"Ollama refused to delete the model ({exc.error}); it was not deleted, "
                                     "try again") from None
    except (httpx.HTTPError, ConnectionError):
        raise ServiceUnavailable("Ollama (AFINA_OLLAMA_URL) cannot be reached; the model was not deleted, try "
                                 "again shortly") from None
