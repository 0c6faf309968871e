"""Text metrics against hand-computed values, and BLEU/chrF against sacrebleu called directly."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from afina.evaluator.metrics.text import (
    exact_match,
    lcs_length,
    normalize,
    normalized_exact_match,
    rouge_l,
    text_metrics,
    token_f1,
)


def test_normalize_folds_case_accents_forms_and_punctuation_but_keeps_letters() -> None:
    assert normalize("  Beleza!  Tudo   BEM? ") == "beleza tudo bem"
    assert normalize("Ｏｌá, São Paulo.") == "olá são paulo"  # NFKC folds full-width letters; accents stay
    assert normalize("don't") == "dont"


def test_exact_match_ignores_only_surrounding_whitespace() -> None:
    assert exact_match(" Sim ", "Sim") == 1.0
    assert exact_match("sim", "Sim") == 0.0
    assert normalized_exact_match("Sim!", "sim") == 1.0
    assert normalized_exact_match("sim senhor", "sim") == 0.0


def test_token_f1_by_hand() -> None:
    # prediction tokens: o gato preto dorme (4); reference: o gato dorme muito (4); common: o, gato, dorme = 3
    assert token_f1("O gato preto dorme.", "o gato dorme muito") == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    # repeated tokens count as a multiset: prediction "a a a" vs reference "a b": common 1; p=1/3, r=1/2
    assert token_f1("a a a", "a b") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "") == 1.0
    assert token_f1("algo", "") == 0.0
    assert token_f1("x y", "z") == 0.0


def test_rouge_l_uses_the_longest_common_subsequence() -> None:
    assert lcs_length("a b c d e".split(), "a x c y e".split()) == 3
    # prediction 5 tokens, reference 5 tokens, LCS 3: p = r = 0.6
    assert rouge_l("a b c d e", "a x c y e") == pytest.approx(0.6)
    # word order matters for ROUGE-L but not for token F1
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)
    assert token_f1("c b a", "a b c") == 1.0
    assert rouge_l("", "a") == 0.0


def test_rouge_l_matches_the_rouge_score_package() -> None:
    from rouge_score import rouge_scorer

    class Whitespace:
        def tokenize(self, text: str) -> list[str]:
            return normalize(text).split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    for prediction, reference in [("o gato preto dorme", "o gato dorme muito"), ("c b a", "a b c")]:
        assert rouge_l(prediction, reference) == pytest.approx(scorer.score(reference, prediction)["rougeL"].fmeasure)


def test_split_figures_are_means_of_example_scores_and_corpus_bleu_chrf() -> None:
    predictions = ["Beleza! Vou acender a luz.", "Sure thing! Lights on.", "Não sei."]
    references = ["Beleza! Vou acender a luz da sala.", "Sure thing! Lights on.", "Claro, desligando."]
    metrics = text_metrics(predictions, references)
    assert metrics.exact_match == pytest.approx(1 / 3)
    assert metrics.normalized_exact_match == pytest.approx(1 / 3)
    # example 1: 5 predicted tokens, 7 reference tokens, 5 common: p=1, r=5/7
    first = 2 * 1 * (5 / 7) / (1 + 5 / 7)
    assert metrics.token_f1 == pytest.approx((first + 1.0 + 0.0) / 3)
    assert metrics.rouge_l == pytest.approx((first + 1.0 + 0.0) / 3)  # LCS = the 5 common tokens, in order
    assert metrics.bleu == sacrebleu.corpus_bleu(predictions, [references]).score
    assert metrics.chrf == sacrebleu.corpus_chrf(predictions, [references]).score
    assert 0 < metrics.bleu < 100 and not math.isnan(metrics.chrf)


def test_mismatched_or_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        text_metrics([], [])
