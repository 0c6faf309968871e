"""On-demand evaluations: checked here (a 400 names what is wrong before anything is queued), run by the
evaluator as a job of kind ``evaluation`` with its own events and result files.

The checks: the model is one of the tenant's registered fine-tunes; each metric is one afina computes; each
model key names the base, the fine-tuned model or an exported GGUF variant; a file is the tenant's, ingested,
and holds examples in the format the job trained on; an LLM judge is one the operator set up (its model, or a
catalog base model the gateway serves to every tenant). A label set that does not fit the references fails the
evaluation job itself (the references are read by the worker), never the fine-tuning job or its model.
"""

from __future__ import annotations

import logging

from afina.core.artifacts import DATASET_MANIFEST, DatasetManifest, ExportManifest, ManifestInvalid, ServedArtifacts
from afina.core.catalog import catalog_model
from afina.core.db import repository as repo
from afina.core.db.models import Job, Model
from afina.core.errors import InvalidRequest, NotFound
from afina.core.evaluation_jobs import (
    EVALUATION_KIND,
    EvaluationSpec,
    JudgeSpec,
    add_on_demand_evaluation,
    evaluation_jobs_of,
)
from afina.core.logging import log_event
from afina.core.quality_gate import METRIC_DIRECTIONS
from afina.core.queue import outbox
from afina.core.runtime import Runtime
from afina.gateway.evaluations.protocol import Evaluation, EvaluationList, EvaluationRequest, JudgeRequest

log = logging.getLogger("afina.gateway")
HF_MODELS = ("base", "fine_tuned")


def evaluation_object(job: Job) -> Evaluation:
    spec = EvaluationSpec.of_job(job)
    return Evaluation(id=job.id, fine_tuning_job_id=spec.source_job_id, model=spec.model, status=job.status,
                      created_at=job.created_at, finished_at=job.finished_at, error=job.error, file=spec.file_id,
                      models=spec.models, metrics=spec.metrics, judge=spec.judge,
                      result_files=list(job.result_files or []), automatic=not spec.on_demand)


def _fine_tune(runtime: Runtime, tenant_id: str, job_id: str) -> tuple[Job, Model]:
    with runtime.db.session() as session:
        job = repo.get_job(session, tenant_id, job_id)
        model = repo.get_model(session, tenant_id, job.fine_tuned_model) if job.fine_tuned_model else None
    if job.kind != "fine_tune" or model is None:
        raise InvalidRequest(f"job {job_id} has no fine-tuned model to evaluate (status {job.status})",
                             param="fine_tuning_job_id", code="model_not_ready")
    return job, model


def _model(runtime: Runtime, tenant_id: str, name: str) -> tuple[Job, Model]:
    with runtime.db.session() as session:
        model = repo.get_model(session, tenant_id, name)
        if model is None:
            raise NotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model",
                           code="model_not_found")
        job = repo.get_job(session, tenant_id, model.job_id)
    return job, model


def check_metrics(metrics: list[str] | None) -> list[str] | None:
    if metrics is None:
        return None
    unknown = [name for name in metrics if name not in METRIC_DIRECTIONS]
    if unknown or not metrics:
        raise InvalidRequest(f"unknown metric(s) {unknown!r}; afina computes: {', '.join(sorted(METRIC_DIRECTIONS))}"
                             if unknown else "metrics must name at least one metric", param="metrics",
                             code="unknown_metric")
    return list(dict.fromkeys(metrics))


def check_models(runtime: Runtime, model: Model, names: list[str] | None) -> list[str] | None:
    """Model keys (``base``, ``fine_tuned``, ``gguf:<variant>``) from what a user writes (``fine-tuned``,
    ``q4_k_m``, ``Q4_K_M``, ``gguf:q8_0``); a 400 listing what exists otherwise."""
    if names is None:
        return None
    try:
        export = ExportManifest.read(runtime.store, ServedArtifacts.of_row(model.artifacts, model.name).manifest)
    except ManifestInvalid:
        export = None
    variants = sorted(export.gguf) if export is not None else []
    available = [*HF_MODELS, *(f"gguf:{variant}" for variant in variants)]
    keys = []
    for name in names:
        plain = name.strip().lower().replace("-", "_")
        key = plain if plain in HF_MODELS or plain.startswith("gguf:") else f"gguf:{plain}"
        if key not in available:
            raise InvalidRequest(f"models names {name!r}, which {model.name} does not have; available: "
                                 f"{', '.join(available)}", param="models", code="unknown_model")
        keys.append(key)
    if not keys:
        raise InvalidRequest("models must name at least one model", param="models")
    return list(dict.fromkeys(keys))


def check_judge(runtime: Runtime, asked: JudgeRequest | None) -> JudgeSpec | None:
    """The judge's model and rubric, resolved now (what the evaluation runs with is stored on it): the request's
    model when it is the operator's judge or a catalog base model (served to every key), else the operator's."""
    if asked is None:
        return None
    configured = runtime.settings.evaluation_judge_model
    if asked.model is not None:
        spec = catalog_model(asked.model)
        if asked.model != configured and spec is None:
            raise InvalidRequest(f"judge.model names {asked.model!r}, which is not a judge this gateway serves; use "
                                 + (f"{configured!r} (the operator's judge) or " if configured else "")
                                 + "a base model of GET /v1/models owned by 'afina'", param="judge.model",
                                 code="unknown_judge_model")
        model = asked.model if spec is None else spec.id
    elif configured:
        model = configured
    else:
        raise InvalidRequest("no LLM judge is set up on this gateway: name one in judge.model, or ask the operator "
                             "to set AFINA_EVALUATION_JUDGE_MODEL", param="judge", code="judge_not_configured")
    return JudgeSpec(model=model, **({"rubric": asked.rubric} if asked.rubric is not None else {}))


def check_file(runtime: Runtime, tenant_id: str, source: Job, file_id: str | None) -> str | None:
    """The file's committed dataset version, when it is the tenant's, ingested, and in the job's format."""
    if file_id is None:
        return None
    with runtime.db.session() as session:
        row = repo.get_file(session, tenant_id, file_id)
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"file {file_id} has purpose {row.purpose!r}; evaluate on a file uploaded with "
                             "purpose 'fine-tune'", param="file")
    if row.status != "processed" or not row.dataset_key:
        raise InvalidRequest(f"file {file_id} is not ready to evaluate on (status {row.status}"
                             + (f": {row.status_details}" if row.status_details else "") + "); wait until it is "
                             "processed", param="file", code="file_not_ready")
    try:
        evaluated = DatasetManifest.read(runtime.store, f"{row.dataset_key}/{DATASET_MANIFEST}")
        trained = (DatasetManifest.read(runtime.store, f"{source.dataset_key}/{DATASET_MANIFEST}")
                   if source.dataset_key else None)
    except ManifestInvalid as exc:
        raise InvalidRequest(f"file {file_id} cannot be read: {exc.message}", param="file") from None
    if evaluated is None:
        raise InvalidRequest(f"file {file_id} has no committed dataset", param="file", code="file_not_ready")
    if trained is not None and evaluated.format != trained.format:
        raise InvalidRequest(f"file {file_id} holds {evaluated.format!r} examples but the model was trained on "
                             f"{trained.format!r} examples; upload the test data in the training data's format",
                             param="file", code="format_mismatch")
    return row.dataset_key


def create_evaluation(runtime: Runtime, tenant_id: str, body: EvaluationRequest, *, job_id: str | None = None,
                      model_name: str | None = None) -> Evaluation:
    """Check the request, then queue the evaluation job with its message (one transaction)."""
    source, model = (_fine_tune(runtime, tenant_id, job_id) if job_id is not None
                     else _model(runtime, tenant_id, str(model_name)))
    spec = EvaluationSpec(model=model.name, source_job_id=source.id, on_demand=True,
                          labels=list(body.labels) if body.labels else None, metrics=check_metrics(body.metrics),
                          models=check_models(runtime, model, body.models), file_id=body.file,
                          dataset_key=check_file(runtime, tenant_id, source, body.file),
                          judge=check_judge(runtime, body.judge))
    with runtime.db.session() as session:
        job, message = add_on_demand_evaluation(session, repo.get_job(session, tenant_id, source.id), spec)
        result = evaluation_object(job)
    outbox.deliver(runtime, [message])
    log_event(log, "evaluation.created", job_id=result.id, tenant=tenant_id, model=model.name)
    return result


def list_evaluations(runtime: Runtime, tenant_id: str, job_id: str) -> EvaluationList:
    with runtime.db.session() as session:
        source = repo.get_job(session, tenant_id, job_id)
        return EvaluationList(data=[evaluation_object(job) for job in evaluation_jobs_of(session, source)])


def get_evaluation(runtime: Runtime, tenant_id: str, job_id: str, evaluation_id: str) -> Evaluation:
    with runtime.db.session() as session:
        job = repo.get_job(session, tenant_id, evaluation_id)
    if job.kind != EVALUATION_KIND or EvaluationSpec.of_job(job).source_job_id != job_id:
        raise NotFound(f"job {job_id} has no evaluation {evaluation_id}", param="evaluation_id")
    return evaluation_object(job)
