"""The evaluation stage on scripted models: figures, result files, the gate on the model, resume, bad input."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import orjson
import pytest

from afina.core.artifacts.evaluation import EvaluationManifest, ModelEvaluation, QualityGate, refuse_blocked
from afina.core.db import repository as repo
from afina.core.db.models import File, Model
from afina.core.errors import ModelBlocked
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job, evaluation_prefix
from tests.support.evaluation import (
    TENANT,
    ScriptedModels,
    WorkerKilled,
    build_evaluated_job,
    conversation,
    label_of,
    wrong_label_of,
)
from tests.support.jobs import context_for


def runtime_for(tmp_path: Path, **settings: object) -> Runtime:
    return Runtime(Settings(home=tmp_path / "home", log_json=False, **settings))  # type: ignore[arg-type]


def scripts(q4_answer=label_of) -> dict[str, dict]:  # noqa: ANN001
    return {"base": {"answer": lambda _user: "não sei", "token_logprob": -2.0},
            "fine_tuned": {"answer": label_of, "token_logprob": -0.5, "label_bonus": 0.4},
            "gguf:f16": {"answer": label_of, "token_logprob": -0.5, "label_bonus": 0.4},
            "gguf:q4_k_m": {"answer": q4_answer, "token_logprob": -0.52, "label_bonus": 0.4}}


def run(runtime: Runtime, job_id: str, models: ScriptedModels) -> str:
    return run_stage(runtime, job_id, "evaluate", lambda context: evaluate_job(context, plan_models=models))


def job_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def model_row(runtime: Runtime, name: str) -> Model:
    with runtime.db.session() as session:
        row = session.get(Model, name)
        assert row is not None
        return row


def test_every_model_is_scored_and_the_gate_passes_a_good_fine_tune(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    job = build_evaluated_job(runtime, tmp_path)
    assert run(runtime, job.evaluation_job_id, ScriptedModels(scripts())) == "done"
    evaluation = job_row(runtime, job.evaluation_job_id)
    assert evaluation.status == "succeeded", evaluation.error
    manifest = EvaluationManifest.read(runtime.store, f"{evaluation_prefix(TENANT, job.source.id)}/evaluation.json")
    assert manifest is not None
    assert list(manifest.models) == ["base", "fine_tuned", "gguf:f16", "gguf:q4_k_m"]
    assert manifest.split == "test" and manifest.examples == 8
    assert manifest.task == "classification" and manifest.labels == ["negativo", "positivo"]
    assert manifest.main_metric == "macro_f1"
    base, tuned = manifest.models["base"], manifest.models["fine_tuned"]
    # every answer token scored at the scripted log-probability: loss = -logprob, perplexity = e^loss; the
    # fine-tuned script is 0.4 more sure of the answer it gives, which is every reference: 0.5 - 0.4
    assert base.loss == pytest.approx(2.0) and base.perplexity == pytest.approx(math.exp(2.0))
    assert tuned.loss == pytest.approx(0.1) and tuned.perplexity == pytest.approx(math.exp(0.1))
    assert base.classification is not None and tuned.classification is not None
    assert base.classification.accuracy == 0.0 and base.classification.unmatched == 8
    assert tuned.classification.accuracy == 1.0 and tuned.classification.macro_f1 == 1.0
    assert tuned.classification.confusion == [[4, 0, 0], [0, 4, 0]]
    assert tuned.classification.macro_auc == 1.0  # the right label always gets the larger probability
    assert tuned.text.exact_match == 1.0 and base.text.exact_match == 0.0
    # the train/held-out gap: the same scripted logprob on both sides -> no gap
    assert manifest.loss_gap is not None and manifest.loss_gap.gap == pytest.approx(0.0)
    assert manifest.loss_gap.overfitting is False and manifest.loss_gap.train_examples == 6
    gate = manifest.quality_gate
    assert gate.passed and not gate.enforced
    assert {check.rule for check in gate.checks} == {"not_worse_than_base", "variant_within_tolerance",
                                                     "variant_perplexity_ratio"}
    # the gate is on the model row, the source job and its model otherwise untouched
    stored = QualityGate.model_validate(model_row(runtime, job.model_name).quality_gate)
    assert stored == gate
    source = job_row(runtime, job.source.id)
    assert source.status == "succeeded" and source.fine_tuned_model == job.model_name


def test_result_files_are_the_jobs_and_read_back(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    job = build_evaluated_job(runtime, tmp_path)
    run(runtime, job.evaluation_job_id, ScriptedModels(scripts()))
    source = job_row(runtime, job.source.id)
    with runtime.db.session() as session:
        names = {session.get(File, file_id).filename for file_id in source.result_files}
    assert {"evaluation.json", "evaluation_summary.csv", "predictions.jsonl", "evaluation.md", "evaluation.html",
            "metrics_overview.png", "confusion_matrix.png", "score_distribution.png", "roc_curve.png"} <= names
    prefix = evaluation_prefix(TENANT, job.source.id)
    rows = list(csv.DictReader(io.StringIO(runtime.store.get_bytes(f"{prefix}/evaluation_summary.csv").decode())))
    assert [row["model"] for row in rows] == ["base", "fine_tuned", "gguf:f16", "gguf:q4_k_m"]
    assert float(rows[1]["macro_f1"]) == 1.0 and float(rows[0]["loss"]) == 2.0
    lines = [orjson.loads(line) for line in runtime.store.get_bytes(f"{prefix}/predictions.jsonl").splitlines()]
    assert len(lines) == 8
    first = lines[1]
    assert first["reference"] == "positivo" and first["answers"]["base"] == "não sei"
    assert first["answers"]["fine_tuned"] == "positivo" and first["answer_labels"]["base"] is None
    assert first["label_probabilities"]["fine_tuned"]["positivo"] > 0.5
    for chart in ("metrics_overview.png", "confusion_matrix.png", "score_distribution.png"):
        assert runtime.store.get_bytes(f"{prefix}/{chart}").startswith(b"\x89PNG")
    page = runtime.store.get_bytes(f"{prefix}/evaluation.md").decode()
    assert "| model |" in page and "Quality gate: passed." in page


def test_the_section_is_spliced_into_the_jobs_report_once(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    job = build_evaluated_job(runtime, tmp_path)
    report = f"jobs/{TENANT}/{job.source.id}/report"
    runtime.store.put_bytes(f"{report}/report.md", b"# Training report\n\n## Results\n\nloss 1.0\n")
    runtime.store.put_bytes(f"{report}/report.html", b"<!DOCTYPE html><html><body><h1>Training</h1></body></html>\n")
    run(runtime, job.evaluation_job_id, ScriptedModels(scripts()))
    markdown = runtime.store.get_bytes(f"{report}/report.md").decode()
    html_page = runtime.store.get_bytes(f"{report}/report.html").decode()
    assert markdown.startswith("# Training report") and markdown.count("## Evaluation") == 1
    assert "](../evaluation/metrics_overview.png)" in markdown
    assert html_page.count("<h2>Evaluation</h2>") == 1 and html_page.rstrip().endswith("</body></html>")
    assert "data:image/png;base64," in html_page
    # report.pdf rendered from the spliced page, its charts included, and a result file of the job
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(runtime.store.get_bytes(f"{report}/report.pdf")))
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "Training" in text and "Evaluation" in text and "Quality gate: passed." in text
    assert len([image for page in reader.pages for image in page.images]) == html_page.count("data:image/png")
    with runtime.db.session() as session:
        names = {session.get(File, file_id).filename for file_id in job_row(runtime, job.source.id).result_files}
    assert {"report.md", "report.html", "report.pdf"} <= names


def test_a_degraded_quantization_fails_the_gate_and_an_enforced_gate_blocks_serving(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, quality_gate={"enforce": True, "variant_tolerance": 0.05})
    job = build_evaluated_job(runtime, tmp_path)
    assert run(runtime, job.evaluation_job_id, ScriptedModels(scripts(q4_answer=wrong_label_of))) == "done"
    gate = QualityGate.model_validate(model_row(runtime, job.model_name).quality_gate)
    assert not gate.passed and gate.enforced and gate.blocks_serving
    failed = [check for check in gate.checks if not check.passed]
    # its wrong answers: macro F1 0 against f16's 1; and its confidence sits on the wrong label, so each reference
    # token costs 0.52 nats against f16's 0.1
    assert [(check.rule, check.model, check.value, check.reference) for check in failed] == [
        ("variant_within_tolerance", "gguf:q4_k_m", 0.0, 1.0),
        ("variant_perplexity_ratio", "gguf:q4_k_m", pytest.approx(math.exp(0.52)), pytest.approx(math.exp(0.1)))]
    with pytest.raises(ModelBlocked, match="failed its quality gate.*Q4_K_M|q4_k_m"):
        refuse_blocked(job.model_name, model_row(runtime, job.model_name).quality_gate)
    assert job_row(runtime, job.evaluation_job_id).status == "succeeded"  # the evaluation itself worked
    with runtime.db.session() as session:
        events, _more = repo.list_events(session, job.source.id, None, 50)
        messages = [event.message for event in events]
    assert any("quality gate failed and is enforced" in message and "blocked from serving" in message
               for message in messages), messages


def test_a_passed_gate_does_not_block(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, quality_gate={"enforce": True})
    job = build_evaluated_job(runtime, tmp_path)
    run(runtime, job.evaluation_job_id, ScriptedModels(scripts()))
    refuse_blocked(job.model_name, model_row(runtime, job.model_name).quality_gate)  # no exception


def test_a_worker_killed_mid_evaluation_resumes_without_rescoring_finished_models(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    job = build_evaluated_job(runtime, tmp_path)
    models = ScriptedModels(scripts(), fail_on_load="gguf:f16")
    with pytest.raises(WorkerKilled):
        evaluate_job(context_for(runtime, job_row(runtime, job.evaluation_job_id), "evaluate"), plan_models=models)
    prefix = evaluation_prefix(TENANT, job.source.id)
    assert ModelEvaluation.read(runtime.store, f"{prefix}/models/base.json") is not None
    assert ModelEvaluation.read(runtime.store, f"{prefix}/models/fine_tuned.json") is not None
    assert runtime.store.exists(f"{prefix}/evaluation.json") is False  # nothing committed
    with runtime.db.session() as session:  # the lease of the dead worker runs out
        repo.release_lease(session, job.evaluation_job_id, job_row(runtime, job.evaluation_job_id).lease_owner or "")
    models.fail_on_load = None
    assert run(runtime, job.evaluation_job_id, models) == "done"
    assert models.loads == {"base": 1, "fine_tuned": 1, "gguf:f16": 2, "gguf:q4_k_m": 1}
    assert job_row(runtime, job.evaluation_job_id).status == "succeeded"


def test_a_stored_result_for_other_inputs_is_computed_again(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path)
    job = build_evaluated_job(runtime, tmp_path)
    models = ScriptedModels(scripts(), fail_on_load="gguf:f16")
    with pytest.raises(WorkerKilled):
        evaluate_job(context_for(runtime, job_row(runtime, job.evaluation_job_id), "evaluate"), plan_models=models)
    with runtime.db.session() as session:
        repo.release_lease(session, job.evaluation_job_id, job_row(runtime, job.evaluation_job_id).lease_owner or "")
    # the attempt that resumes runs with another generation budget: base and fine-tuned are scored again
    resumed = Runtime(runtime.settings.model_copy(update={"evaluation_max_new_tokens": 7}))
    models.fail_on_load = None
    assert run(resumed, job.evaluation_job_id, models) == "done"
    assert models.loads == {"base": 2, "fine_tuned": 2, "gguf:f16": 2, "gguf:q4_k_m": 1}


@pytest.mark.parametrize(("kwargs", "code", "words"), [
    ({"test": [], "validation": []}, "empty_split", "no test or validation split"),
    ({"test": [{"messages": [{"role": "user", "content": "oi"}]}]}, "empty_split", "none is a conversation"),
    ({"labels": ["positivo", "neutro"]}, "label_set_mismatch", "outside the declared label set"),
])
def test_bad_input_fails_the_evaluation_naming_it_and_leaves_job_and_model_alone(
        tmp_path: Path, kwargs: dict, code: str, words: str) -> None:
    runtime = runtime_for(tmp_path)
    job = build_evaluated_job(runtime, tmp_path, **kwargs)
    models = ScriptedModels(scripts())
    assert run(runtime, job.evaluation_job_id, models) == "failed"
    evaluation = job_row(runtime, job.evaluation_job_id)
    assert evaluation.error["code"] == code and words in evaluation.error["message"]
    assert models.loads == {}  # refused before any model was loaded
    source = job_row(runtime, job.source.id)
    assert source.status == "succeeded" and source.error is None
    assert model_row(runtime, job.model_name).quality_gate is None


def test_a_label_metric_for_a_free_text_task_is_refused_by_name(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, quality_gate={"main_metric": "macro_f1"})
    texts = [conversation(f"pergunta {i}", f"resposta longa número {i} sobre o assunto") for i in range(4)]
    job = build_evaluated_job(runtime, tmp_path, test=texts)
    assert run(runtime, job.evaluation_job_id, ScriptedModels(scripts())) == "failed"
    error = job_row(runtime, job.evaluation_job_id).error
    assert "'macro_f1' needs answers from a label set" in error["message"]


def test_an_unknown_metric_in_the_gate_rules_stops_the_settings() -> None:
    with pytest.raises(ValueError, match="'bleurt' is not a metric afina computes; known: auto, accuracy"):
        Settings(quality_gate={"main_metric": "bleurt"})  # type: ignore[arg-type]


def test_a_batching_scorer_answers_in_batches_with_the_same_figures(tmp_path: Path) -> None:
    from dataclasses import dataclass, field

    from afina.evaluator.scoring import GENERATION_BATCH
    from tests.support import evaluation as support

    @dataclass
    class Batching(support.ScriptedScorer):
        batches: list[int] = field(default_factory=list)

        def generate_many(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
            self.batches.append(len(prompts))
            return [self.generate(prompt, max_new_tokens) for prompt in prompts]

    made: list[Batching] = []
    runtime = runtime_for(tmp_path)
    tests = [conversation(f"avalie: produto {i} {'ótimo' if i % 2 else 'péssimo'}",
                          "positivo" if i % 2 else "negativo") for i in range(GENERATION_BATCH + 3)]
    job = build_evaluated_job(runtime, tmp_path, test=tests)

    class BatchingModels(ScriptedModels):
        def __call__(self, *, tokenizer, export, **rest):  # noqa: ANN001, ANN003, ANN204
            plans = super().__call__(tokenizer=tokenizer, export=export, **rest)

            def load(key: str):  # noqa: ANN202
                def make() -> Batching:
                    made.append(Batching(tokenizer=tokenizer, **self.scripts[key]))
                    return made[-1]
                return make
            return [type(plan)(key=plan.key, kind=plan.kind, title=plan.title, identity=plan.identity,
                               load=load(plan.key)) for plan in plans]

    assert run(runtime, job.evaluation_job_id, BatchingModels(scripts())) == "done"
    assert all(scorer.batches == [GENERATION_BATCH, 3] for scorer in made) and len(made) == 4
    manifest = EvaluationManifest.read(runtime.store, f"{evaluation_prefix(TENANT, job.source.id)}/evaluation.json")
    assert manifest is not None and manifest.models["fine_tuned"].classification.accuracy == 1.0  # type: ignore[union-attr]
