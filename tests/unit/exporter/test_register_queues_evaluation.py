"""Registering a fine-tune queues its evaluation (its own job on the ``evaluate`` queue) in the same transaction;
a registration run again queues no second one, and the operator can turn evaluation off."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from afina.core.artifacts import ServedArtifacts
from afina.core.db import repository as repo
from afina.core.db.models import Job, OutboxMessage
from afina.core.evaluation_jobs import EVALUATION_JOB_EVENT_KEY, EvaluationSpec, evaluation_jobs_of
from afina.core.queue.names import QUEUE_EVALUATE, TASK_EVALUATE
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.exporter.register import register_export
from tests.support.jobs import context_for, create_job

SERVED = ServedArtifacts.build(gguf={"f16": "models/acme/j/model-f16.gguf"}, serve="f16",
                               modelfile="models/acme/j/Modelfile", manifest="models/acme/j/manifest.json",
                               adapter="jobs/acme/j/adapter")


def register(runtime: Runtime, *, publish_after_gate: bool = False) -> tuple[Job, str]:
    job = create_job(runtime, "acme", "file-x", stage="export", status="running")
    name = register_export(context_for(runtime, job, "export"), SERVED, message="ready",
                           publish_after_gate=publish_after_gate)
    return job, name


def test_the_registration_queues_one_evaluation_job_with_its_message(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False))
    job, name = register(runtime, publish_after_gate=True)
    with runtime.db.session() as session:
        source = repo.get_job(session, None, job.id)
        evaluations = evaluation_jobs_of(session, source)
        assert source.status == "succeeded" and len(evaluations) == 1
        evaluation = evaluations[0]
        assert (evaluation.kind, evaluation.stage, evaluation.status) == ("evaluation", "evaluate", "queued")
        assert EvaluationSpec.of_job(evaluation) == EvaluationSpec(model=name, source_job_id=job.id,
                                                                   publish_on_pass=True)
        message = session.scalars(select(OutboxMessage).where(OutboxMessage.subject_id == evaluation.id)).one()
        assert (message.task, message.queue) == (TASK_EVALUATE, QUEUE_EVALUATE)
        events, _more = repo.list_events(session, job.id, None, 20)
        assert any((event.data or {}).get(EVALUATION_JOB_EVENT_KEY) == evaluation.id for event in events)
        # registering again (a resumed export) adds nothing
        register_again = repo.get_job(session, None, job.id)
    from afina.core.evaluation_jobs import add_evaluation_job

    with runtime.db.session() as session:
        assert add_evaluation_job(session, repo.get_job(session, None, register_again.id), name) is None
        assert len(evaluation_jobs_of(session, repo.get_job(session, None, job.id))) == 1


def test_no_evaluation_when_the_operator_turns_it_off(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, log_json=False, evaluation_enabled=False))
    job, _name = register(runtime)
    with runtime.db.session() as session:
        assert evaluation_jobs_of(session, repo.get_job(session, None, job.id)) == []
        assert repo.get_job(session, None, job.id).status == "succeeded"
