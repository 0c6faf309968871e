"""The evaluation stage: the base, fine-tuned and exported models of a job, scored on its held-out examples.

Read top to bottom, ``evaluate_job`` is the whole story:

1. what to evaluate: the evaluation job's ``EvaluationSpec`` names the fine-tuning job and its model; the
   model's ``ExportManifest`` lists the GGUF variants;
2. on what: the held-out split (test, else validation) of the job's committed dataset, and the label set
   (declared, or detected from the references), refused with a reason before any model is loaded;
3. each model in turn — base, fine-tuned (transformers), then every GGUF (llama.cpp in process) — its
   ``ModelEvaluation`` written as soon as it is done; a resumed attempt reuses every result whose
   fingerprint (examples, weights, settings) still matches, so a killed worker loses at most one model;
   when the evaluation asked for the LLM judge (``judge``), each model's answers are graded right after it is
   scored; a judge that fails is recorded as failed and the evaluation goes on;
4. the train/held-out loss gap, the quality gate, the result files, the report section, ``evaluation.json``
   LAST; then the gate is recorded on the model row and the evaluation job succeeds.

A failure here fails only the evaluation job: the fine-tuning job and its model are never written to,
except the model's ``quality_gate`` and the job's result files at the very end.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.orm import Session

from afina.core.artifacts import ADAPTER_MARKER, AdapterManifest, ExportManifest, FileEntry, ManifestInvalid
from afina.core.artifacts.evaluation import (
    EVALUATION_MANIFEST,
    EvaluationManifest,
    LossGap,
    ModelEvaluation,
    ModelSummary,
    QualityGate,
)
from afina.core.artifacts.export import ServedArtifacts
from afina.core.catalog import BaseModelSpec
from afina.core.datasets.layout import adapter_prefix, job_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job, Model
from afina.core.errors import EvaluationFailed
from afina.core.evaluation_jobs import EvaluationSpec, add_publish_job
from afina.core.logging import log_event
from afina.core.queue import outbox
from afina.core.queue.jobs import JobContext
from afina.core.reports import splice_report_pages
from afina.core.store import ArtifactStore
from afina.core.store.base import sha256_file
from afina.core.training.lifecycle import job_base_model
from afina.evaluator import charts
from afina.evaluator.examples import Example, file_examples, held_out_examples, tokenize, train_examples
from afina.evaluator.gate import FINE_TUNED, apply_gate, main_metric
from afina.evaluator.judge import ChatClient, Judge, judge_spec_for, open_judge
from afina.evaluator.metrics.classification import check_declared_labels, detect_labels
from afina.evaluator.results import (
    SECTION,
    predictions_jsonl,
    render_html_section,
    render_markdown_section,
    section_blocks,
    standalone_html,
    summary_csv,
)
from afina.evaluator.scoring import ModelPlan, ScoringInputs, fit_context, score_model

log = logging.getLogger("afina.evaluator")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SUMMARY_CSV, PREDICTIONS_JSONL = "evaluation_summary.csv", "predictions.jsonl"
SECTION_MD, SECTION_HTML = "evaluation.md", "evaluation.html"
CHART_OVERVIEW, CHART_CONFUSION = "metrics_overview.png", "confusion_matrix.png"
CHART_SCORES, CHART_ROC = "score_distribution.png", "roc_curve.png"


def evaluation_prefix(tenant_id: str, job_id: str) -> str:
    """Where a fine-tuning job's evaluation lives (next to its report)."""
    return f"{job_prefix(tenant_id, job_id)}/evaluation"


def evaluate_job(context: JobContext, *, plan_models: Callable[..., list[ModelPlan]] | None = None,
                 judge_client: ChatClient | None = None) -> None:
    runtime = context.runtime
    settings = runtime.settings
    store = runtime.store
    job = context.snapshot()
    spec = EvaluationSpec.of_job(job)
    source, export = _evaluated(runtime, job, spec)

    if spec.dataset_key:
        split, examples = "file", file_examples(runtime, spec.dataset_key, settings.evaluation_max_examples,
                                                spec.file_id or spec.dataset_key)
    else:
        split, examples = held_out_examples(runtime, source.dataset_key, settings.evaluation_max_examples)
    references = [example.reference for example in examples]
    labels = (check_declared_labels(spec.labels, references) if spec.labels
              else detect_labels(references, settings.evaluation_max_labels))
    task = "classification" if labels else "text"
    rules = settings.quality_gate
    if spec.metrics:
        rules = rules.model_copy(update={"main_metric": spec.metrics[0]})
    metric = main_metric(rules, task)
    where = f"the file {spec.file_id}" if split == "file" else f"the {split} split"
    context.event(f"Evaluating {spec.model} on {len(examples)} example(s) of {where} ("
                  + (f"labels: {', '.join(labels)}" if labels else "free-text answers") + f"; main metric {metric})")
    judge_spec = judge_spec_for(spec, settings)
    judge = open_judge(settings, judge_spec, judge_client) if judge_spec is not None else None

    prefix = (f"{job_prefix(source.tenant_id, source.id)}/evaluations/{context.job_id}" if spec.on_demand
              else evaluation_prefix(source.tenant_id, source.id))
    work_dir = settings.resolved_work_dir / context.job_id / "evaluate"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        base = job_base_model(source, store=store, allowed_model_dirs=settings.allowed_model_dirs)
        adapter_dir, adapter = download_adapter(store, source.tenant_id, source.id, work_dir / "adapter")
        tokenizer = _tokenizer(adapter_dir, base, store, settings.resolved_model_cache_dir)
        n_ctx = min(settings.inference_n_ctx, base.context_length)
        reserve = settings.evaluation_max_new_tokens

        def prepared(example: Example) -> Any:
            return fit_context(tokenize(tokenizer, example), n_ctx, reserve)

        inputs = ScoringInputs(
            examples=[prepared(e) for e in examples], labels=labels,
            label_answers=[{label: tokenize(tokenizer, e, answer=label).answer_ids for label in labels}
                           for e in examples] if labels else None,
            train=[prepared(e) for e in train_examples(runtime, source.dataset_key,
                                                        settings.evaluation_train_examples)],
            max_new_tokens=settings.evaluation_max_new_tokens)
        plans = (plan_models or model_plans)(runtime=runtime, base=base, adapter_dir=adapter_dir, adapter=adapter,
                                             export=export, tokenizer=tokenizer, work_dir=work_dir, n_ctx=n_ctx)
        if spec.models:
            plans = [plan for plan in plans if plan.key in spec.models]
        inputs_digest = _digest([[t.prompt_ids, t.answer_ids] for t in inputs.examples], labels,
                                inputs.label_answers, inputs.max_new_tokens, n_ctx,
                                [[t.prompt_ids, t.answer_ids] for t in inputs.train])
        results: dict[str, ModelEvaluation] = {}
        for plan in plans:
            context.check_continue()
            result_key = f"{prefix}/models/{plan.key}.json"
            results[plan.key] = _evaluate_model(context, plan, inputs, result_key,
                                                fingerprint=_digest(inputs_digest, plan.identity))
            if judge is not None:
                results[plan.key] = _judged(context, judge, results[plan.key], examples, result_key)
        gap = loss_gap(results.get(FINE_TUNED), settings.evaluation_overfit_gap)
        manifest_key = f"{prefix}/{EVALUATION_MANIFEST}"
        gate = apply_gate(results, rules, metric, evaluation_key=manifest_key)
        files = write_result_files(store, prefix, source=source, examples=examples, results=results, split=split,
                                   task=task, labels=labels, metric=metric, gap=gap, gate=gate,
                                   into_report=not spec.on_demand)
        manifest = EvaluationManifest.build(
            job_id=source.id, model=spec.model, split=split, examples=len(examples), task=task, labels=labels,
            main_metric=metric, metrics=spec.metrics, file_id=spec.file_id,
            models={key: ModelSummary.of(result) for key, result in results.items()},
            loss_gap=gap, quality_gate=gate, files=files, created_at=int(time.time()),
            judge=judge.config if judge is not None else None)
        committed = FileEntry.of(manifest.write(store, manifest_key))  # the commit marker
        _finish(context, spec, source, gate, {**files, EVALUATION_MANIFEST: committed},
                summary_lines(results, metric, gap, gate))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _remove_if_empty(work_dir.parent)
    return None


def _evaluated(runtime: Any, job: Job, spec: EvaluationSpec) -> tuple[Job, ExportManifest]:
    """The fine-tuning job and its model's export manifest; ``EvaluationFailed`` when either is gone."""
    with runtime.db.session() as session:
        source = repo.get_job(session, job.tenant_id, spec.source_job_id)
        model = repo.get_model(session, job.tenant_id, spec.model)
        artifacts = model.artifacts if model is not None else None
    if artifacts is None:
        raise EvaluationFailed(f"model {spec.model} is not registered (it was deleted, or its export has not "
                               "finished)", code="model_not_found")
    served = ServedArtifacts.of_row(artifacts, spec.model)
    try:
        export = ExportManifest.read(runtime.store, served.manifest)
    except ManifestInvalid as exc:
        raise EvaluationFailed(f"the export manifest of {spec.model} cannot be read ({exc.message})") from None
    if export is None:
        raise EvaluationFailed(f"model {spec.model} has no export manifest at {served.manifest}")
    return source, export


def model_plans(*, runtime: Any, base: BaseModelSpec, adapter_dir: Path, adapter: AdapterManifest,
                export: ExportManifest, tokenizer: Any, work_dir: Path, n_ctx: int) -> list[ModelPlan]:
    """Base and fine-tuned through transformers, then every GGUF variant (f16 first) through llama.cpp."""
    from afina.core.hfmodels import materialize_base_model
    from afina.evaluator.gguf import GgufScorer
    from afina.evaluator.hf import HfScorer

    settings = runtime.settings
    stop_ids = sorted({i for token in base.family.stop
                       if (i := tokenizer.convert_tokens_to_ids(token)) is not None and i != tokenizer.unk_token_id}
                      | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))

    def base_dir() -> Path:
        return materialize_base_model(base, settings.resolved_model_cache_dir, store=runtime.store)

    def gguf(variant: str) -> Any:
        entry = export.gguf[variant]
        path = work_dir / entry.key.rsplit("/", 1)[-1]
        if not path.exists() or sha256_file(path) != entry.sha256:
            runtime.store.download_file(entry.key, path)
            if sha256_file(path) != entry.sha256:
                raise EvaluationFailed(f"the {variant.upper()} GGUF of {export.name} does not match the sha256 "
                                       "its export manifest recorded")
        return GgufScorer(path, n_ctx, settings.inference_threads)

    adapter_identity = _digest([entry.sha256 for entry in adapter.files])
    plans = [ModelPlan(key="base", kind="hf", title=f"base ({base.id})", identity=f"base:{base.id}",
                       load=lambda: HfScorer.load(base_dir(), tokenizer, stop_ids, threads=settings.inference_threads)),
             ModelPlan(key=FINE_TUNED, kind="hf", title="fine-tuned", identity=f"adapter:{adapter_identity}",
                       load=lambda: HfScorer.load(base_dir(), tokenizer, stop_ids, adapter_dir=adapter_dir,
                                                  threads=settings.inference_threads))]
    for variant, entry in export.gguf.items():
        plans.append(ModelPlan(key=f"gguf:{variant}", kind="gguf", title=f"{variant.upper()} GGUF",
                               identity=f"gguf:{entry.sha256}:{n_ctx}", load=lambda v=variant: gguf(v)))
    return plans


def _evaluate_model(context: JobContext, plan: ModelPlan, inputs: ScoringInputs, key: str, *,
                    fingerprint: str) -> ModelEvaluation:
    """The model's stored result when it was computed from these inputs, else a fresh one (stored at once)."""
    store = context.runtime.store
    try:
        stored = ModelEvaluation.read(store, key)
    except ManifestInvalid:
        stored = None
    if stored is not None and stored.fingerprint == fingerprint:
        context.event(f"Reusing the evaluation of {plan.title} from an earlier attempt")
        return stored
    started = time.monotonic()
    scorer = plan.load()
    try:
        result = score_model(scorer, plan, inputs, fingerprint=fingerprint, check_continue=context.check_continue,
                             with_train=plan.key == FINE_TUNED)
    finally:
        scorer.close()
    result.write(store, key)
    loss = "–" if result.loss is None else f"{result.loss:.4f}"
    context.event(f"Evaluated {plan.title}: loss {loss}, token F1 {result.text.token_f1:.4f}, ROUGE-L "
                  f"{result.text.rouge_l:.4f}, chrF {result.text.chrf:.2f}"
                  + (f", macro F1 {result.classification.macro_f1:.4f}" if result.classification else "")
                  + f" ({time.monotonic() - started:.1f} s)",
                  data={"phase": "evaluate", "model": plan.key, "seconds": round(time.monotonic() - started, 2)})
    log_event(log, "evaluation.model", job_id=context.job_id, model=plan.key, seconds=result.seconds)
    return result


def _judged(context: JobContext, judge: Judge, result: ModelEvaluation, examples: list[Example],
            key: str) -> ModelEvaluation:
    """The model's result with the judge's grades (stored at once); grades made by this judge on an earlier
    attempt are reused, a failed judge is asked again."""
    stored = result.judge
    if stored is not None and stored.identity == judge.identity and stored.error is None:
        return result
    started = time.monotonic()
    graded = judge.grade(examples, result.answers, context.check_continue)
    result = result.model_copy(update={"judge": graded})
    result.write(context.runtime.store, key)
    mean = "–" if graded.mean is None else f"{graded.mean:.4f}"
    if graded.error is not None:
        context.event(f"The LLM judge failed for {result.title}: {graded.error}; the other metrics are "
                      f"unaffected ({graded.unscored} example(s) unscored)", level="warn",
                      data={"phase": "judge", "model": result.key, "judge_error": graded.error})
    else:
        context.event(f"LLM judge ({judge.spec.model}) on {result.title}: mean score {mean} over {graded.scored} "
                      f"example(s), {graded.unscored} unscored ({time.monotonic() - started:.1f} s)",
                      data={"phase": "judge", "model": result.key, "judge_mean": graded.mean,
                            "judge_unscored": graded.unscored})
    return result


def loss_gap(tuned: ModelEvaluation | None, max_gap: float) -> LossGap | None:
    if tuned is None or tuned.train_loss is None or tuned.loss is None:
        return None
    gap = tuned.loss - tuned.train_loss
    return LossGap(train_loss=tuned.train_loss, heldout_loss=tuned.loss, gap=gap, max_gap=max_gap,
                   overfitting=gap > max_gap, train_examples=tuned.train_examples)


def write_result_files(store: ArtifactStore, prefix: str, *, source: Job, examples: list[Example],
                       results: dict[str, ModelEvaluation], split: str, task: str, labels: list[str] | None,
                       metric: str, gap: LossGap | None, gate: QualityGate,
                       into_report: bool = True) -> dict[str, FileEntry]:
    """Put every result file, and the evaluation section into the job's report pages; name -> its object."""
    images = {CHART_OVERVIEW: charts.metric_overview(results),
              CHART_SCORES: charts.score_distribution(results, [e.reference for e in examples])}
    for name, drawn in ((CHART_CONFUSION, charts.confusion_matrices(results)), (CHART_ROC, charts.roc_curves(results))):
        if drawn is not None:
            images[name] = drawn
    captions = {CHART_OVERVIEW: "Metrics by model", CHART_CONFUSION: "Confusion matrices",
                CHART_SCORES: "Per-example token F1", CHART_ROC: "ROC curves (one label against the rest)"}
    blocks = section_blocks(split=split, examples=len(examples), task=task, labels=labels, metric=metric,
                            results=results, gap=gap, gate=gate,
                            charts=[(captions[name], name) for name in images])
    html_section = render_html_section(blocks, images)
    contents = {SUMMARY_CSV: summary_csv(results), PREDICTIONS_JSONL: predictions_jsonl(examples, results, labels),
                SECTION_MD: ("# Evaluation of " + source.id + "\n\n" + render_markdown_section(blocks, "")).encode(),
                SECTION_HTML: standalone_html(f"Evaluation of {source.id}", html_section).encode(), **images}
    files = {name: FileEntry.of(store.put_bytes(f"{prefix}/{name}", data)) for name, data in contents.items()}
    if into_report:  # the pages the trainer wrote, and report.pdf rendered again from the spliced HTML page
        sections = {True: html_section, False: render_markdown_section(blocks, "../evaluation/")}
        files.update(splice_report_pages(store, f"{job_prefix(source.tenant_id, source.id)}/report", sections,
                                         name=SECTION))
    return files


def summary_lines(results: dict[str, ModelEvaluation], metric: str, gap: LossGap | None,
                  gate: QualityGate) -> list[str]:
    lines = [f"{result.title}: {metric} {_value(result.metric(metric))}, perplexity {_value(result.perplexity)}"
             + (f", judge score {_value(result.judge.mean)} ({result.judge.unscored} unscored)"
                if result.judge is not None else "")
             for result in results.values()]
    if gap is not None:
        lines.append(f"Train/held-out loss gap {gap.gap:.4f}" + (" — overfitting detected" if gap.overfitting else ""))
    return lines


def _finish(context: JobContext, spec: EvaluationSpec, source: Job, gate: QualityGate, files: dict[str, FileEntry],
            lines: list[str]) -> None:
    """Result files on both jobs, the gate on the model, the evaluation job succeeded: one transaction."""
    for line in lines:
        context.event(line)
    messages = []
    verdict = ("passed" if gate.passed else
               f"failed and is enforced: {spec.model} is blocked from serving" if gate.blocks_serving else
               "failed (not enforced: the model stays served)")
    detail = "; ".join(gate.failures())

    def change(session: Session, job: Job) -> None:
        file_ids = [repo.add_result_file(session, source.tenant_id, object_key=entry.key,
                                         filename=entry.key.rsplit("/", 1)[-1], size=entry.bytes,
                                         sha256=entry.sha256).id for entry in files.values()]
        session.flush()
        job.result_files = file_ids
        if spec.on_demand:  # its results are its own: the job's files and the model's gate stay as they are
            repo.set_status(session, job, "succeeded", message=f"Evaluation finished (main metric {gate.main_metric})")
            return
        row = repo.get_job(session, None, source.id)
        row.result_files = [*row.result_files, *(i for i in file_ids if i not in row.result_files)]
        model = session.get(Model, spec.model)
        if model is not None:
            model.quality_gate = gate.model_dump(mode="json")
        repo.add_event(session, source.id, f"Evaluation finished: quality gate {verdict}" + (f" ({detail})" if detail
                                                                                              else ""),
                       level="info" if gate.passed else "warn")
        if spec.publish_on_pass and gate.passed:
            message = add_publish_job(session, source, spec.model)
            if message is not None:
                messages.append(message)
        repo.set_status(session, job, "succeeded",
                        message=f"Evaluation finished: quality gate {verdict}" + (f" ({detail})" if detail else ""))

    context.write(change, "evaluation result")
    outbox.deliver(context.runtime, messages)


def download_adapter(store: ArtifactStore, tenant_id: str, job_id: str,
                     adapter_dir: Path) -> tuple[Path, AdapterManifest]:
    """The trainer's committed adapter (and tokenizer), every file checked against its sha256, nothing pickled."""
    prefix = adapter_prefix(tenant_id, job_id)
    try:
        marker = AdapterManifest.read(store, f"{prefix}/{ADAPTER_MARKER}")
    except ManifestInvalid as exc:
        raise EvaluationFailed(f"the trained adapter's commit marker cannot be read ({exc.message})") from None
    if marker is None:
        raise EvaluationFailed(f"no committed adapter for job {job_id}: nothing to evaluate")
    for entry in marker.files:
        if entry.key.endswith(PICKLE_SUFFIXES):
            continue
        local = store.download_file(entry.key, adapter_dir / marker.name_of(entry, prefix))
        if sha256_file(local) != entry.sha256:
            raise EvaluationFailed(f"adapter file {marker.name_of(entry, prefix)} of job {job_id} changed after the "
                                   "trainer committed it")
    return adapter_dir, marker


def _tokenizer(adapter_dir: Path, base: BaseModelSpec, store: ArtifactStore, cache_dir: Path) -> Any:
    """The fine-tuned model's tokenizer (saved with its adapter; the base's when it was not), stock template."""
    from transformers import AutoTokenizer

    if not (adapter_dir / "tokenizer_config.json").is_file():
        from afina.core.hfmodels import materialize_base_model

        adapter_dir = materialize_base_model(base, cache_dir, store=store)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.chat_template = base.family.stock_template
    return tokenizer


def _digest(*parts: Any) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _value(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
