"""The quality gate: the operator's rules applied to an evaluation's figures.

Two kinds of rule (``GateRules``): the fine-tuned model is not worse than the base on the main metric
(by at least ``min_gain_over_base``), and each quantized GGUF stays within ``variant_tolerance`` of the
16-bit GGUF on the main metric and within ``max_perplexity_ratio`` of its perplexity. A figure that was
not computed fails its rule (a gate never passes on a missing number).
"""

from __future__ import annotations

import time
from typing import Literal

from afina.core.artifacts.evaluation import GateCheck, ModelEvaluation, QualityGate
from afina.core.errors import EvaluationFailed
from afina.core.quality_gate import AUTO_METRIC, CLASSIFICATION_METRICS, METRIC_DIRECTIONS, GateRules

BASE, FINE_TUNED, F16 = "base", "fine_tuned", "gguf:f16"


def main_metric(rules: GateRules, task: Literal["text", "classification"]) -> str:
    """The metric the gate compares on; ``EvaluationFailed`` when the rules name a label metric for a text task."""
    if rules.main_metric == AUTO_METRIC:
        return "macro_f1" if task == "classification" else "token_f1"
    if rules.main_metric in CLASSIFICATION_METRICS and task != "classification":
        raise EvaluationFailed(f"the quality gate's main metric {rules.main_metric!r} needs answers from a label "
                               "set, and this job's references are free text; set AFINA_QUALITY_GATE's main_metric "
                               "to a text metric (token_f1, rouge_l, chrf, ...) or auto", param="main_metric")
    return rules.main_metric


def worse_by(metric: str, value: float, reference: float) -> float:
    """How much worse ``value`` is than ``reference`` (negative: better), whichever way the metric points."""
    return reference - value if METRIC_DIRECTIONS[metric] == "higher" else value - reference


def apply_gate(results: dict[str, ModelEvaluation], rules: GateRules, metric: str, *,
               evaluation_key: str) -> QualityGate:
    checks: list[GateCheck] = []
    base, tuned = results.get(BASE), results.get(FINE_TUNED)
    if base is not None and tuned is not None:
        value, reference = tuned.metric(metric), base.metric(metric)
        passed = value is not None and reference is not None and \
            -worse_by(metric, value, reference) >= rules.min_gain_over_base
        checks.append(GateCheck(
            rule="not_worse_than_base", model=FINE_TUNED, against=BASE, metric=metric, value=value,
            reference=reference, limit=rules.min_gain_over_base, passed=passed,
            message=f"fine-tuned {metric} {_show(value)} vs base {_show(reference)}: "
                    f"{'passes' if passed else 'fails'} (must gain at least {rules.min_gain_over_base!r})"))
    anchor_key = F16 if F16 in results else FINE_TUNED
    anchor = results.get(anchor_key)
    for key, result in results.items():
        if not key.startswith("gguf:") or key == anchor_key or anchor is None:
            continue
        value, reference = result.metric(metric), anchor.metric(metric)
        passed = value is not None and reference is not None and \
            worse_by(metric, value, reference) <= rules.variant_tolerance
        checks.append(GateCheck(
            rule="variant_within_tolerance", model=key, against=anchor_key, metric=metric, value=value,
            reference=reference, limit=rules.variant_tolerance, passed=passed,
            message=f"{result.title} {metric} {_show(value)} vs {anchor.title} {_show(reference)}: "
                    f"{'within' if passed else 'outside'} the tolerance {rules.variant_tolerance!r}"))
        if rules.max_perplexity_ratio is not None:
            ratio = (result.perplexity / anchor.perplexity
                     if result.perplexity is not None and anchor.perplexity else None)
            passed = ratio is not None and ratio <= rules.max_perplexity_ratio
            checks.append(GateCheck(
                rule="variant_perplexity_ratio", model=key, against=anchor_key, metric="perplexity",
                value=result.perplexity, reference=anchor.perplexity, limit=rules.max_perplexity_ratio,
                passed=passed, message=f"{result.title} perplexity is {_show(ratio)}x {anchor.title}'s: "
                                       f"{'within' if passed else 'over'} the limit {rules.max_perplexity_ratio!r}x"))
    return QualityGate(passed=all(check.passed for check in checks), enforced=rules.enforce, main_metric=metric,
                       rules=rules, checks=checks, evaluation=evaluation_key, evaluated_at=int(time.time()))


def _show(value: float | None) -> str:
    return "not computed" if value is None else repr(value)
