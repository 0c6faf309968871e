"""An evaluation is a job of its own (``kind="evaluation"``, stage ``evaluate``, queue ``evaluate``).

The export stage creates one for every fine-tuned model it registers, in the registration's transaction
(its message goes through the outbox), so the fine-tuning job is ``succeeded`` as soon as its model can be
called and the evaluation runs apart, on workers that scale apart from training. Being a job, an evaluation
gets the lease, retries, cancellation and events of every stage; its failure (no held-out split, a label set
that does not fit) is its own and leaves the fine-tuning job and its model untouched.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.core import ids
from afina.core.db import repository as repo
from afina.core.db.models import Job, OutboxMessage
from afina.core.queue import outbox

EVALUATION_KIND = "evaluation"
EVALUATE_STAGE = "evaluate"
EVALUATION_JOB_EVENT_KEY = "evaluation_job_id"  # in the data of the fine-tuning job's event naming its evaluation
EXPORT_KIND = "export"  # a re-export job (afina.exporter.target), here the publishing a passed gate releases

# what the LLM judge grades when a request gives no rubric of its own (afina.evaluator.judge adds the scale)
DEFAULT_JUDGE_RUBRIC = (
    "Grade the model's answer against the reference answer.\n"
    "- Task: does the answer do what the reference does (same decision, label, facts or action)? Style and length "
    "may differ.\n"
    "- Correctness: every claim in the answer is right; a wrong label, number or fact is a serious error.\n"
    "- Faithfulness: nothing invented beyond the question and the reference.\n"
    "- Language: the answer is in the language of the question (a question in Portuguese is answered in "
    "Portuguese); an answer in another language is at most 2.\n"
    "5: as good as the reference. 4: right, with a minor flaw. 3: partly right. 2: mostly wrong, or in the "
    "wrong language. 1: wrong, empty or unrelated.")


class JudgeSpec(BaseModel):
    """The LLM judge an evaluation asked for, resolved once when it is queued (the model and rubric it ran with)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="the judge model the gateway serves")
    rubric: str = Field(DEFAULT_JUDGE_RUBRIC, description="what the judge grades")


class EvaluationSpec(BaseModel):
    """What an evaluation job evaluates (its row's ``method["evaluation"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="the fine-tuned model's name")
    source_job_id: str = Field(description="the fine-tuning job whose model, adapter and dataset are evaluated")
    labels: list[str] | None = Field(None, description="a declared label set (else detected from the references)")
    publish_on_pass: bool = Field(False, description="the export held Ollama/Hub publishing back for the gate: "
                                                     "a passed gate queues it")
    # an evaluation asked for (POST .../evaluations) rather than the one every export queues: it may name a file,
    # the models and the metrics; its results are its own (the model's gate and the job's files stay as they are)
    on_demand: bool = False
    file_id: str | None = Field(None, description="the uploaded file evaluated on (else the job's held-out split)")
    dataset_key: str | None = Field(None, description="that file's committed dataset version")
    models: list[str] | None = Field(None, description="model keys to score (base, fine_tuned, gguf:<variant>); "
                                                       "None: all")
    metrics: list[str] | None = Field(None, description="the metrics asked for; the first is the main one")
    judge: JudgeSpec | None = Field(None, description="grade the answers with an LLM judge (else: the operator's "
                                                      "AFINA_EVALUATION_JUDGE_AUTOMATIC decides, for an automatic "
                                                      "evaluation)")

    @classmethod
    def of_job(cls, job: Job) -> EvaluationSpec:
        return cls.model_validate((job.method or {}).get(EVALUATION_KIND) or {})


def add_evaluation_job(session: Session, source: Job, model_name: str, *, labels: list[str] | None = None,
                       publish_on_pass: bool = False) -> OutboxMessage | None:
    """Create the automatic evaluation job of ``source``'s model and its ``evaluate`` message, in the caller's
    transaction; None when one already exists (a re-run registration adds no second evaluation)."""
    if any(not EvaluationSpec.of_job(existing).on_demand for existing in evaluation_jobs_of(session, source)):
        return None
    spec = EvaluationSpec(model=model_name, source_job_id=source.id, labels=labels, publish_on_pass=publish_on_pass)
    return _add(session, source, spec)[1]


def add_on_demand_evaluation(session: Session, source: Job, spec: EvaluationSpec) -> tuple[Job, OutboxMessage]:
    """An evaluation someone asked for (checked by the caller), queued in the caller's transaction."""
    return _add(session, source, spec)


def _add(session: Session, source: Job, spec: EvaluationSpec) -> tuple[Job, OutboxMessage]:
    model_name = spec.model
    job = Job(id=ids.job_id(), tenant_id=source.tenant_id, model=source.model, base_model=source.base_model,
              training_file=source.training_file, suffix=source.suffix, seed=source.seed, hyperparameters={},
              method={"type": EVALUATION_KIND, EVALUATION_KIND: spec.model_dump(mode="json")},
              kind=EVALUATION_KIND, status="queued", stage=EVALUATE_STAGE)
    session.add(job)
    session.flush()
    repo.add_event(session, job.id, f"Evaluation of {model_name} queued")
    repo.add_event(session, source.id, f"Evaluation of {model_name} queued as {job.id}",
                   data={EVALUATION_JOB_EVENT_KEY: job.id, "on_demand": spec.on_demand})
    return job, outbox.add_stage(session, EVALUATE_STAGE, job.id)


def evaluation_jobs_of(session: Session, source: Job) -> list[Job]:
    """Every evaluation job of ``source`` (newest first)."""
    rows = session.scalars(select(Job).where(Job.tenant_id == source.tenant_id, Job.kind == EVALUATION_KIND,
                                             Job.training_file == source.training_file)
                           .order_by(Job.created_at.desc()))
    return [row for row in rows if EvaluationSpec.of_job(row).source_job_id == source.id]


def add_publish_job(session: Session, source: Job, model_name: str) -> OutboxMessage:
    """A re-export of ``model_name`` with its job's own export options, queued in the caller's transaction: how a
    model whose publishing waited for the quality gate gets published once the gate passed (the exporter
    reuses the files its manifest lists and only publishes)."""
    job = Job(id=ids.job_id(), tenant_id=source.tenant_id, model=source.model, base_model=source.base_model,
              training_file=source.training_file, suffix=source.suffix, seed=source.seed, hyperparameters={},
              method={"type": EXPORT_KIND, EXPORT_KIND: {"model": model_name, "source_job_id": source.id}},
              kind=EXPORT_KIND, export_options=source.export_options, status="queued", stage="export")
    session.add(job)
    session.flush()
    repo.add_event(session, job.id, f"Publishing of {model_name} queued: its quality gate passed")
    return outbox.add_stage(session, "export", job.id)
