"""The quality gate's rules by hand: direction of each metric, tolerances, and missing figures."""

from __future__ import annotations

import pytest

from afina.core.artifacts.evaluation import ModelEvaluation, TextMetrics
from afina.core.errors import EvaluationFailed
from afina.core.quality_gate import GateRules
from afina.evaluator.gate import apply_gate, main_metric, worse_by


def result(key: str, *, f1: float, loss: float | None, perplexity: float | None = None) -> ModelEvaluation:
    text = TextMetrics(exact_match=0, normalized_exact_match=0, token_f1=f1, rouge_l=f1, bleu=0, chrf=0)
    return ModelEvaluation.build(key=key, kind="gguf" if key.startswith("gguf") else "hf", title=key,
                                 fingerprint="x", examples=1, loss=loss, perplexity=perplexity, scored_tokens=1,
                                 text=text, answers=["a"], example_losses=[loss], seconds=0.0)


def test_worse_by_follows_the_metric_direction() -> None:
    assert worse_by("token_f1", 0.4, 0.5) == pytest.approx(0.1)
    assert worse_by("loss", 1.2, 1.0) == pytest.approx(0.2)
    assert worse_by("loss", 0.8, 1.0) == pytest.approx(-0.2)


def test_auto_metric_and_a_label_metric_on_text_is_refused() -> None:
    assert main_metric(GateRules(), "text") == "token_f1"
    assert main_metric(GateRules(), "classification") == "macro_f1"
    assert main_metric(GateRules(main_metric="chrf"), "classification") == "chrf"
    with pytest.raises(EvaluationFailed, match="macro_auc"):
        main_metric(GateRules(main_metric="macro_auc"), "text")


def test_tolerances_by_hand_on_a_lower_is_better_metric() -> None:
    results = {"base": result("base", f1=0.1, loss=2.0, perplexity=7.0),
               "fine_tuned": result("fine_tuned", f1=0.5, loss=1.0, perplexity=2.7),
               "gguf:f16": result("gguf:f16", f1=0.5, loss=1.0, perplexity=2.7),
               "gguf:q8_0": result("gguf:q8_0", f1=0.5, loss=1.04, perplexity=2.8),
               "gguf:q4_k_m": result("gguf:q4_k_m", f1=0.5, loss=1.06, perplexity=2.9)}
    rules = GateRules(main_metric="loss", variant_tolerance=0.05, max_perplexity_ratio=None)
    gate = apply_gate(results, rules, "loss", evaluation_key="k")
    verdicts = {(check.rule, check.model): check.passed for check in gate.checks}
    assert verdicts == {("not_worse_than_base", "fine_tuned"): True,
                        ("variant_within_tolerance", "gguf:q8_0"): True,  # 0.04 worse: within 0.05
                        ("variant_within_tolerance", "gguf:q4_k_m"): False}  # 0.06 worse
    assert not gate.passed and not gate.blocks_serving


def test_a_required_gain_over_base_and_a_figure_not_computed_both_fail() -> None:
    results = {"base": result("base", f1=0.40, loss=None), "fine_tuned": result("fine_tuned", f1=0.45, loss=None)}
    gate = apply_gate(results, GateRules(min_gain_over_base=0.1), "token_f1", evaluation_key="k")
    assert [check.passed for check in gate.checks] == [False]  # gained 0.05 of the 0.1 asked
    gate = apply_gate(results, GateRules(), "loss", evaluation_key="k")
    assert gate.checks[0].passed is False and "not computed" in gate.checks[0].message
