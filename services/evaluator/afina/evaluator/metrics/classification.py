"""Classification metrics when the answers come from a small label set.

A generated answer is mapped to a label by its normalized text (``text.normalize``): the label it equals,
else the longest label it starts with on a word boundary ("Positivo. O cliente..." is ``positivo``), else
none — an unmatched answer counts wrong and has its own confusion column. Precision, recall and F1 follow
scikit-learn's ``precision_recall_fscore_support(labels=..., zero_division=0)``; AUC its ``roc_auc_score``
one class against the rest (ties share their rank).
"""

from __future__ import annotations

from collections import Counter

from afina.core.artifacts.evaluation import ClassificationMetrics, ClassMetrics, RocCurve
from afina.core.errors import EvaluationFailed
from afina.evaluator.metrics.text import normalize

DEFAULT_MAX_LABELS = 20
MAX_LABEL_WORDS = 5


def detect_labels(references: list[str], max_labels: int = DEFAULT_MAX_LABELS) -> list[str] | None:
    """The label set when the references look like one, else None.

    A label task has between 2 and ``max_labels`` distinct (normalized) short answers, each used on
    average at least twice.
    """
    spellings: dict[str, Counter[str]] = {}
    for reference in references:
        key = normalize(reference)
        if not key or len(key.split()) > MAX_LABEL_WORDS:
            return None
        spellings.setdefault(key, Counter())[reference.strip()] += 1
    if not 2 <= len(spellings) <= max_labels or len(spellings) * 2 > len(references):
        return None
    # ordered by normalized text; each written as most references write it (the first seen on a tie)
    return [spellings[key].most_common(1)[0][0] for key in sorted(spellings)]


def check_declared_labels(labels: list[str], references: list[str]) -> list[str]:
    """Declared labels, refused (``EvaluationFailed``) when a reference is none of them."""
    known = {normalize(label) for label in labels}
    if len(known) < 2:
        raise EvaluationFailed(f"a label task needs at least two distinct labels, got {labels!r}", param="labels")
    stray = sorted({reference.strip() for reference in references if normalize(reference) not in known})
    if stray:
        raise EvaluationFailed(f"the references hold {len(stray)} answer(s) outside the declared label set "
                               f"{labels!r}: {stray[:5]!r}; declare every label or evaluate as text",
                               param="labels", code="label_set_mismatch")
    return list(labels)


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer gives, or None."""
    said = normalize(answer)
    by_key = {normalize(label): label for label in labels}
    if said in by_key:
        return by_key[said]
    for key in sorted(by_key, key=len, reverse=True):
        if said.startswith(key + " "):
            return by_key[key]
    return None


def reference_labels(references: list[str], labels: list[str]) -> list[str]:
    matched = [match_label(reference, labels) for reference in references]
    missing = [reference for reference, label in zip(references, matched, strict=True) if label is None]
    if missing:
        raise EvaluationFailed(f"reference(s) {missing[:5]!r} are not in the label set {labels!r}",
                               param="labels", code="label_set_mismatch")
    return [label for label in matched if label is not None]


def classification_metrics(answers: list[str], references: list[str], labels: list[str],
                           probabilities: list[dict[str, float]] | None = None) -> ClassificationMetrics:
    """Accuracy, per-class and macro precision/recall/F1, the confusion matrix and, given each example's label
    probabilities, one-vs-rest ROC curves and AUC."""
    truth = reference_labels(references, labels)
    predicted = [match_label(answer, labels) for answer in answers]
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * (len(labels) + 1) for _ in labels]
    for expected, got in zip(truth, predicted, strict=True):
        confusion[index[expected]][index[got] if got is not None else len(labels)] += 1
    per_class: dict[str, ClassMetrics] = {}
    for label in labels:
        i = index[label]
        true_positive = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = true_positive / predicted_as if predicted_as else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = ClassMetrics(precision=precision, recall=recall, f1=f1, support=support)
    count = len(labels)
    roc = None
    macro_auc = None
    if probabilities is not None:
        roc = {label: roc_curve([t == label for t in truth], [p.get(label, 0.0) for p in probabilities])
               for label in labels}
        defined = [curve.auc for curve in roc.values() if curve.auc is not None]
        macro_auc = sum(defined) / len(defined) if defined else None
    return ClassificationMetrics(
        labels=list(labels), accuracy=sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth),
        per_class=per_class, macro_precision=sum(c.precision for c in per_class.values()) / count,
        macro_recall=sum(c.recall for c in per_class.values()) / count,
        macro_f1=sum(c.f1 for c in per_class.values()) / count, confusion=confusion,
        unmatched=sum(p is None for p in predicted), roc=roc, macro_auc=macro_auc)


def roc_curve(positive: list[bool], scores: list[float]) -> RocCurve:
    """ROC points at every distinct score (highest first, from (0, 0)) and the area under them; the area is
    None when the examples are all of one side."""
    positives = sum(positive)
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        return RocCurve(fpr=[], tpr=[], auc=None)
    ranked = sorted(zip(scores, positive, strict=True), key=lambda pair: -pair[0])
    fpr, tpr = [0.0], [0.0]
    true_seen = false_seen = 0
    for i, (score, is_positive) in enumerate(ranked):
        true_seen += is_positive
        false_seen += not is_positive
        if i + 1 == len(ranked) or ranked[i + 1][0] != score:
            fpr.append(false_seen / negatives)
            tpr.append(true_seen / positives)
    area = sum((fpr[i] - fpr[i - 1]) * (tpr[i] + tpr[i - 1]) / 2 for i in range(1, len(fpr)))
    return RocCurve(fpr=fpr, tpr=tpr, auc=area)
