"""Text metrics of generated answers against references.

Exact match and token F1 follow the SQuAD evaluation script, ROUGE-L the ``rouge-score`` package's
F-measure (beta 1) on tokens, BLEU and chrF come from ``sacrebleu`` so the figures compare with published
ones. Normalization is language-neutral (users write Portuguese and English): Unicode NFKC, casefolding,
punctuation removed, whitespace collapsed; SQuAD's English article rule is left out on purpose.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

from afina.core.artifacts.evaluation import TextMetrics


def normalize(text: str) -> str:
    """The text a normalized comparison sees: NFKC, casefolded, without punctuation, single-spaced."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(char for char in folded if not unicodedata.category(char).startswith("P"))
    return " ".join(kept.split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer is the reference, surrounding whitespace aside."""
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over the multiset of normalized tokens; two empty texts agree (1.0), one empty text scores 0."""
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def lcs_length(left: list[str], right: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming over one row)."""
    if not left or not right:
        return 0
    previous = [0] * (len(right) + 1)
    for item in left:
        current = [0]
        for j, other in enumerate(right, start=1):
            current.append(previous[j - 1] + 1 if item == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure on normalized tokens (0.0 when either side is empty, as ``rouge-score`` has it)."""
    predicted, expected = tokens(prediction), tokens(reference)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (exponential smoothing), for the per-example score distribution."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


@dataclass(frozen=True)
class ExampleScores:
    """One answer's scores (the per-example predictions file and the score distribution chart)."""

    exact_match: float
    normalized_exact_match: float
    token_f1: float
    rouge_l: float

    @classmethod
    def of(cls, prediction: str, reference: str) -> ExampleScores:
        return cls(exact_match=exact_match(prediction, reference),
                   normalized_exact_match=normalized_exact_match(prediction, reference),
                   token_f1=token_f1(prediction, reference), rouge_l=rouge_l(prediction, reference))


def text_metrics(predictions: list[str], references: list[str]) -> TextMetrics:
    """The split's text figures: means of the per-example scores, corpus BLEU and chrF (sacrebleu, 0-100)."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} answers for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    scores = [ExampleScores.of(p, r) for p, r in zip(predictions, references, strict=True)]
    count = len(scores)
    return TextMetrics(
        exact_match=sum(s.exact_match for s in scores) / count,
        normalized_exact_match=sum(s.normalized_exact_match for s in scores) / count,
        token_f1=sum(s.token_f1 for s in scores) / count,
        rouge_l=sum(s.rouge_l for s in scores) / count,
        bleu=float(sacrebleu.corpus_bleu(predictions, [references]).score),
        chrf=float(sacrebleu.corpus_chrf(predictions, [references]).score))
