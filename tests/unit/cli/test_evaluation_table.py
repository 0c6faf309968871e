"""The comparison table ``make demo`` prints from a job's ``evaluation.json``."""

from __future__ import annotations

from typing import Any

from afina.cli.evaluation import comparison_table


def figures(title: str, loss: float, f1: float, *, macro_f1: float | None = None) -> dict[str, Any]:
    text = {"exact_match": 0.0, "normalized_exact_match": 0.0, "token_f1": f1, "rouge_l": f1, "bleu": 12.5,
            "chrf": 40.0}
    return {"kind": "hf", "title": title, "loss": loss, "perplexity": 2.0, "scored_tokens": 10, "text": text,
            "classification": None if macro_f1 is None else {"accuracy": macro_f1, "macro_f1": macro_f1},
            "seconds": 1.0}


def evaluation(gate_passed: bool, enforced: bool = False) -> dict[str, Any]:
    checks = [{"rule": "variant_within_tolerance", "model": "gguf:q4_k_m", "passed": gate_passed,
               "message": "Q4_K_M GGUF token_f1 0.1 vs F16 GGUF 0.5: outside the tolerance 0.05"}]
    return {"examples": 8, "split": "validation", "task": "text", "main_metric": "token_f1",
            "models": {"base": figures("base (smollm2-135m-instruct)", 2.5, 0.1234567),
                       "fine_tuned": figures("fine-tuned", 1.25, 0.5),
                       "gguf:q4_k_m": figures("Q4_K_M GGUF", 1.3, 0.1)},
            "quality_gate": {"passed": gate_passed, "enforced": enforced, "checks": checks},
            "loss_gap": {"gap": 0.75, "overfitting": True}}


def test_one_row_per_model_with_the_figures_that_exist() -> None:
    table = comparison_table(evaluation(gate_passed=True)).splitlines()
    assert table[0] == "8 held-out examples (validation split), task text, main metric token_f1"
    assert table[1].split() == ["model", "loss", "ppl", "EM", "normEM", "tokF1", "ROUGE-L", "BLEU", "chrF"]
    assert table[3].split()[:3] == ["base", "(smollm2-135m-instruct)", "2.5"]
    assert "0.123457" in table[3]  # six significant digits
    assert table[5].split()[:4] == ["Q4_K_M", "GGUF", "1.3", "2"]
    assert table[-2] == "quality gate: passed"
    assert table[-1] == "train/held-out loss gap: 0.75 (overfitting)"


def test_a_failed_gate_lists_the_failed_rules() -> None:
    text = comparison_table(evaluation(gate_passed=False, enforced=True))
    assert "quality gate: FAILED (blocks serving)\n  - Q4_K_M GGUF token_f1 0.1 vs F16 GGUF 0.5" in text


def test_a_judged_evaluation_shows_the_judge_mean_and_the_unscored_examples() -> None:
    judged = evaluation(gate_passed=True)
    judged["metrics"] = ["token_f1"]  # the judge column shows even when the metrics were named
    judged["judge"] = {"model": "smollm2-135m-instruct", "rubric": "r", "prompt_version": 1}
    for key, mean, unscored in (("base", 2.25, 0), ("fine_tuned", 4.5, 0), ("gguf:q4_k_m", 4.0, 2)):
        judged["models"][key]["judge"] = {"mean": mean, "scored": 8 - unscored, "unscored": unscored, "error": None}
    table = comparison_table(judged).splitlines()
    assert table[1].split() == ["model", "tokF1", "judge"]
    assert table[4].split() == ["fine-tuned", "0.5", "4.5"]
    assert "judge: smollm2-135m-instruct (score 1-5)" in table
    assert "  - Q4_K_M GGUF: 2 example(s) unscored" in table
    assert not any("fine-tuned:" in line for line in table)  # a model with every example scored says nothing
