"""When the operator enforces the gate, publishing waits for it: a passed gate queues the publication (a
re-export with the job's own options), a failed one blocks it — the exporter records why, contacting nobody."""

from __future__ import annotations

from pathlib import Path

from afina.core.artifacts.publish import OllamaRegistration
from afina.core.db import repository as repo
from afina.core.db.models import Job, Model, OutboxMessage
from afina.core.evaluation_jobs import EVALUATION_KIND
from afina.core.queue.jobs import run_stage
from afina.core.queue.names import QUEUE_EXPORT
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job
from afina.exporter.publish import publish_model
from afina.exporter.target import export_target
from tests.support.evaluation import ScriptedModels, build_evaluated_job, label_of, wrong_label_of
from tests.support.jobs import context_for

EXPORT_OPTIONS = {"ollama": True}


def scripted(q4_answer=label_of) -> ScriptedModels:  # noqa: ANN001
    good = {"answer": label_of, "token_logprob": -0.5, "label_bonus": 0.4}
    return ScriptedModels({"base": {"answer": lambda _user: "não sei", "token_logprob": -2.0},
                           "fine_tuned": good, "gguf:f16": good,
                           "gguf:q4_k_m": {**good, "answer": q4_answer}})


def evaluate_with_publishing_held(tmp_path: Path, models: ScriptedModels) -> tuple[Runtime, Job, str]:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False, quality_gate={"enforce": True},
                               ollama_url="http://127.0.0.1:9"))
    job = build_evaluated_job(runtime, tmp_path)
    with runtime.db.session() as session:
        evaluation = repo.get_job(session, None, job.evaluation_job_id)
        evaluation.method = {**evaluation.method, EVALUATION_KIND: {**evaluation.method[EVALUATION_KIND],
                                                                    "publish_on_pass": True}}
        repo.get_job(session, None, job.source.id).export_options = EXPORT_OPTIONS
    assert run_stage(runtime, job.evaluation_job_id, "evaluate",
                     lambda context: evaluate_job(context, plan_models=models)) == "done"
    return runtime, job.source, job.model_name


def publish_jobs(runtime: Runtime, source: Job) -> list[Job]:
    with runtime.db.session() as session:
        return [row for row in session.query(Job).filter(Job.kind == "export").all()
                if row.method["export"]["source_job_id"] == source.id]


def test_a_passed_gate_queues_the_publication_with_the_jobs_options(tmp_path: Path) -> None:
    runtime, source, name = evaluate_with_publishing_held(tmp_path, scripted())
    [publication] = publish_jobs(runtime, source)
    assert publication.method["export"]["model"] == name and publication.export_options == EXPORT_OPTIONS
    assert (publication.stage, publication.status) == ("export", "queued")
    with runtime.db.session() as session:
        assert session.query(OutboxMessage).filter_by(subject_id=publication.id, queue=QUEUE_EXPORT).count() == 1


def test_a_failed_gate_queues_nothing_and_a_later_export_records_the_block(tmp_path: Path) -> None:
    runtime, source, name = evaluate_with_publishing_held(tmp_path, scripted(q4_answer=wrong_label_of))
    assert publish_jobs(runtime, source) == []
    # an operator's re-export of a blocked model: the exporter refuses to publish it, saying why
    with runtime.db.session() as session:
        export_job = Job(id="ftjob-republish", tenant_id=source.tenant_id, model=source.model,
                         training_file=source.training_file, seed=1, hyperparameters={}, kind="export",
                         method={"type": "export", "export": {"model": name, "source_job_id": source.id}},
                         export_options=EXPORT_OPTIONS, status="running", stage="export")
        session.add(export_job)
    context = context_for(runtime, export_job, "export")
    publish_model(context, export_target(runtime, context.snapshot()))
    with runtime.db.session() as session:
        ollama = OllamaRegistration.model_validate(session.get(Model, name).ollama)
    assert ollama.status == "failed" and ollama.error is not None
    assert ollama.error.startswith("blocked by the quality gate: gguf:q4_k_m macro_f1 0.0 vs gguf:f16 1.0")
