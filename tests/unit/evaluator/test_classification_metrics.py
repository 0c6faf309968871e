"""Classification metrics against hand-computed values and scikit-learn's implementations."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from afina.core.errors import EvaluationFailed
from afina.evaluator.metrics.classification import (
    check_declared_labels,
    classification_metrics,
    detect_labels,
    match_label,
    roc_curve,
)

LABELS = ["negativo", "neutro", "positivo"]


def test_a_small_repeated_answer_set_is_a_label_task_and_free_text_is_not() -> None:
    # spelled as most references spell it, the first seen on a tie
    assert detect_labels(["Positivo", "negativo", "positivo", "Negativo", "positivo"]) == ["negativo", "positivo"]
    assert detect_labels(["sim", "não", "sim", "não"]) == ["não", "sim"]
    assert detect_labels(["Beleza! Vou acender a luz da sala agora mesmo.", "ok", "ok", "x"]) is None  # a long answer
    assert detect_labels(["a", "b", "c", "d"]) is None  # every answer different: no repetition
    assert detect_labels(["sim", "sim", "sim"]) is None  # one label is not a classification
    assert detect_labels([f"l{i % 4}" for i in range(40)], max_labels=3) is None


def test_answers_map_to_labels_by_normalized_text_or_a_leading_label() -> None:
    assert match_label("Positivo.", LABELS) == "positivo"
    assert match_label("positivo, o cliente gostou", LABELS) == "positivo"
    assert match_label("neutralidade", LABELS) is None  # a prefix inside a word is not a label
    assert match_label("talvez", LABELS) is None


def test_declared_labels_that_miss_a_reference_are_refused_naming_it() -> None:
    with pytest.raises(EvaluationFailed, match="outside the declared label set.*'irritado'") as caught:
        check_declared_labels(LABELS, ["positivo", "irritado"])
    assert caught.value.code == "label_set_mismatch"
    with pytest.raises(EvaluationFailed, match="at least two"):
        check_declared_labels(["sim"], ["sim"])


def test_by_hand_on_a_two_class_example() -> None:
    references = ["sim", "sim", "não", "não", "sim"]
    answers = ["sim", "não", "não", "sim", "talvez"]  # the last matches no label
    metrics = classification_metrics(answers, references, ["não", "sim"])
    # confusion rows (reference não, sim); columns (não, sim, none)
    assert metrics.confusion == [[1, 1, 0], [1, 1, 1]]
    assert metrics.accuracy == pytest.approx(2 / 5)
    assert metrics.unmatched == 1
    # sim: tp 1, predicted as sim 2, support 3 -> p 1/2, r 1/3, f1 2/5
    assert metrics.per_class["sim"].precision == pytest.approx(0.5)
    assert metrics.per_class["sim"].recall == pytest.approx(1 / 3)
    assert metrics.per_class["sim"].f1 == pytest.approx(0.4)
    # não: tp 1, predicted 2, support 2 -> p 1/2, r 1/2, f1 1/2
    assert metrics.per_class["não"].f1 == pytest.approx(0.5)
    assert metrics.macro_f1 == pytest.approx((0.4 + 0.5) / 2)


def test_agrees_with_scikit_learn_on_random_predictions() -> None:
    rng = random.Random(7)
    references = [rng.choice(LABELS) for _ in range(200)]
    answers = [rng.choice([*LABELS, "não sei"]) for _ in range(200)]
    metrics = classification_metrics(answers, references, LABELS)
    predicted = [answer if answer in LABELS else "__none__" for answer in answers]
    precision, recall, f1, support = precision_recall_fscore_support(references, predicted, labels=LABELS,
                                                                     zero_division=0)
    for i, label in enumerate(LABELS):
        assert metrics.per_class[label].precision == pytest.approx(precision[i])
        assert metrics.per_class[label].recall == pytest.approx(recall[i])
        assert metrics.per_class[label].f1 == pytest.approx(f1[i])
        assert metrics.per_class[label].support == support[i]
    macro = precision_recall_fscore_support(references, predicted, labels=LABELS, average="macro", zero_division=0)
    assert (metrics.macro_precision, metrics.macro_recall, metrics.macro_f1) == pytest.approx(macro[:3])
    assert metrics.accuracy == pytest.approx(accuracy_score(references, predicted))
    full = confusion_matrix(references, predicted, labels=[*LABELS, "__none__"])
    assert metrics.confusion == full[:len(LABELS)].tolist()


def test_roc_auc_agrees_with_scikit_learn_including_ties() -> None:
    rng = random.Random(3)
    truth = [rng.random() < 0.4 for _ in range(300)]
    scores = [round(rng.random() * 0.6 + (0.3 if t else 0.0), 1) for t in truth]  # rounding makes ties
    curve = roc_curve(truth, scores)
    assert curve.auc == pytest.approx(roc_auc_score(truth, scores))
    assert curve.fpr[0] == 0.0 and curve.tpr[0] == 0.0 and curve.fpr[-1] == 1.0 and curve.tpr[-1] == 1.0
    assert roc_curve([True, True], [0.2, 0.9]).auc is None


def test_macro_auc_is_one_vs_rest_from_label_probabilities() -> None:
    rng = random.Random(11)
    references = [rng.choice(LABELS) for _ in range(120)]
    probabilities = []
    for reference in references:
        raw = {label: rng.random() + (0.7 if label == reference else 0.0) for label in LABELS}
        total = sum(raw.values())
        probabilities.append({label: value / total for label, value in raw.items()})
    answers = [max(p, key=p.get) for p in probabilities]  # type: ignore[arg-type]
    metrics = classification_metrics(answers, references, LABELS, probabilities)
    expected = roc_auc_score(references, [[p[label] for label in LABELS] for p in probabilities],
                             multi_class="ovr", average="macro", labels=LABELS)
    assert metrics.macro_auc == pytest.approx(expected)
    assert metrics.roc is not None and set(metrics.roc) == set(LABELS)


def test_a_reference_outside_the_labels_fails_the_evaluation() -> None:
    with pytest.raises(EvaluationFailed, match="not in the label set"):
        classification_metrics(["sim"], ["talvez"], ["não", "sim"])
