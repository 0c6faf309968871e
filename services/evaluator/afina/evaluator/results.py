"""The evaluation's result files: summary CSV, per-example predictions JSONL, and the report section.

Figures are written exactly as computed (``repr`` of the float) in the CSV and JSON; the tables people read
show ten significant digits, enough that two different figures never print the same.
"""

from __future__ import annotations

import csv
import html
import io
from typing import Any

import orjson

from afina.core.artifacts.evaluation import JUDGE_MAX_SCORE, JUDGE_MIN_SCORE, LossGap, ModelEvaluation, QualityGate
from afina.core.reports import Block, html_section, markdown_section
from afina.core.reports import splice_section as splice_named_section
from afina.evaluator.examples import Example
from afina.evaluator.metrics.classification import match_label
from afina.evaluator.metrics.text import ExampleScores

SUMMARY_COLUMNS = ("model", "kind", "title", "examples", "loss", "perplexity", "exact_match",
                   "normalized_exact_match", "token_f1", "rouge_l", "bleu", "chrf", "accuracy", "macro_precision",
                   "macro_recall", "macro_f1", "macro_auc", "train_loss", "seconds", "judge_score_mean",
                   "judge_scored", "judge_unscored", "judge_error")
TABLE_METRICS = (("loss", "loss"), ("perplexity", "perplexity"), ("exact_match", "EM"),
                 ("normalized_exact_match", "norm. EM"), ("token_f1", "token F1"), ("rouge_l", "ROUGE-L"),
                 ("bleu", "BLEU"), ("chrf", "chrF"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                 ("macro_auc", "macro AUC"))
SECTION = "evaluation"  # its markers in the job's report pages


def figure(value: float | None) -> str:
    return "–" if value is None else format(value, ".10g")


def summary_csv(results: dict[str, ModelEvaluation]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for key, result in results.items():
        values: list[Any] = [key, result.kind, result.title, result.examples]
        values += [result.metric(name) for name in SUMMARY_COLUMNS[4:17]]
        values += [result.train_loss, result.seconds]
        judge = result.judge
        values += ([judge.mean, judge.scored, judge.unscored, judge.error] if judge is not None
                   else [None, None, None, None])
        writer.writerow(["" if value is None else repr(value) if isinstance(value, float) else value
                         for value in values])
    return buffer.getvalue().encode()


def predictions_jsonl(examples: list[Example], results: dict[str, ModelEvaluation],
                      labels: list[str] | None) -> bytes:
    """One line per example: the prompt, the reference and every model's answer side by side, with scores."""
    lines = []
    for index, example in enumerate(examples):
        row: dict[str, Any] = {"index": index, "prompt": example.prompt, "reference": example.reference,
                               "answers": {key: r.answers[index] for key, r in results.items()},
                               "loss": {key: r.example_losses[index] for key, r in results.items()},
                               "scores": {key: ExampleScores.of(r.answers[index], example.reference).__dict__
                                          for key, r in results.items()}}
        if any(r.judge is not None for r in results.values()):
            row["judge"] = {key: {"score": r.judge.scores[index], "reason": r.judge.reasons[index]}
                            for key, r in results.items() if r.judge is not None}
        if labels:
            row["reference_label"] = match_label(example.reference, labels)
            row["answer_labels"] = {key: match_label(r.answers[index], labels) for key, r in results.items()}
            row["label_probabilities"] = {key: r.label_probabilities[index] for key, r in results.items()
                                          if r.label_probabilities is not None}
        lines.append(orjson.dumps(row) + b"\n")
    return b"".join(lines)


def section_blocks(*, split: str, examples: int, task: str, labels: list[str] | None, metric: str,
                   results: dict[str, ModelEvaluation], gap: LossGap | None, gate: QualityGate,
                   charts: list[tuple[str, str]]) -> list[Block]:
    """The evaluation section as blocks (text, table, images), rendered alike into Markdown and HTML."""
    blocks: list[Block] = [("text", f"{examples} held-out example(s) of the {split} split; task: "
                                    + (f"classification over {len(labels or [])} labels ({', '.join(labels or [])})"
                                       if task == "classification" else "free text")
                                    + f"; main metric: `{metric}`.")]
    shown = [(name, title) for name, title in TABLE_METRICS
             if any(result.metric(name) is not None for result in results.values())]
    blocks.append(("table", ["model", *[title for _name, title in shown]],
                   [[result.title, *[figure(result.metric(name)) for name, _title in shown]]
                    for result in results.values()]))
    if gap is not None:
        blocks.append(("text", f"Train/held-out loss gap of the fine-tuned model: {figure(gap.gap)} "
                               f"(train {figure(gap.train_loss)} on {gap.train_examples} examples, held-out "
                               f"{figure(gap.heldout_loss)}); "
                               + (f"overfitting detected (gap above {figure(gap.max_gap)})" if gap.overfitting
                                  else f"no overfitting flagged (limit {figure(gap.max_gap)})") + "."))
    blocks += judge_blocks(results)
    verdict = "passed" if gate.passed else ("FAILED — the model is blocked from serving" if gate.blocks_serving
                                            else "FAILED (not enforced: the model is served)")
    blocks.append(("text", f"Quality gate: {verdict}."))
    if gate.checks:
        blocks.append(("table", ["rule", "model", "value", "compared with", "limit", "result"],
                       [[check.rule, check.model, figure(check.value), f"{check.against} {figure(check.reference)}",
                         figure(check.limit), "pass" if check.passed else "FAIL"] for check in gate.checks]))
    blocks.append(("images", charts))
    return blocks


def judge_blocks(results: dict[str, ModelEvaluation]) -> list[Block]:
    """The LLM judge's table (mean score, scored, unscored per model) and why it failed where it did."""
    judged = {key: result for key, result in results.items() if result.judge is not None}
    if not judged:
        return []
    blocks: list[Block] = [("text", f"LLM judge: each answer graded against its reference from {JUDGE_MIN_SCORE} "
                                    f"to {JUDGE_MAX_SCORE} (mean over the scored examples; the unscored are "
                                    "counted, not averaged in).")]
    blocks.append(("table", ["model", "judge score", "scored", "unscored"],
                   [[result.title, figure(result.judge.mean), str(result.judge.scored), str(result.judge.unscored)]
                    for result in judged.values() if result.judge is not None]))
    failures = list(dict.fromkeys(result.judge.error for result in judged.values()
                                  if result.judge is not None and result.judge.error))
    if failures:
        blocks.append(("text", "The LLM judge failed: " + "; ".join(failures) + "."))
    return blocks


def render_markdown_section(blocks: list[Block], image_prefix: str) -> str:
    return markdown_section(SECTION, "Evaluation", blocks, image_prefix)


def render_html_section(blocks: list[Block], images: dict[str, bytes]) -> str:
    return html_section(SECTION, "Evaluation", blocks, images)


def standalone_html(title: str, section: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:.3em .6em}"
            f"img{{max-width:100%}}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{section}</body></html>\n")


def splice_section(page: str, section: str, *, html_page: bool) -> str:
    """The page with its evaluation section replaced (a later evaluation) or added (at the end)."""
    return splice_named_section(page, section, name=SECTION, html_page=html_page)
