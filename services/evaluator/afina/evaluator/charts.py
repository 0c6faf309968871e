"""The evaluation's charts as PNG bytes: metrics by model, confusion matrices, per-example score distribution,
ROC curves.

matplotlib is imported inside the drawing functions on its Agg backend (no display), so importing this module
costs nothing. A function returns None when there is nothing to draw (no label task: no confusion matrix).
"""

from __future__ import annotations

from afina.core import reports
from afina.core.artifacts.evaluation import ModelEvaluation
from afina.evaluator.metrics.text import token_f1

DPI = 110
# the metrics drawn on one 0-1 axis (BLEU and chrF divided by 100)
OVERVIEW_METRICS = (("normalized_exact_match", "norm. EM", 1.0), ("token_f1", "token F1", 1.0),
                    ("rouge_l", "ROUGE-L", 1.0), ("bleu", "BLEU/100", 100.0), ("chrf", "chrF/100", 100.0),
                    ("accuracy", "accuracy", 1.0), ("macro_f1", "macro F1", 1.0), ("macro_auc", "macro AUC", 1.0))


def metric_overview(results: dict[str, ModelEvaluation]) -> bytes:
    """Grouped bars: each metric, one bar per model."""
    plt = reports.pyplot()
    metrics = [(name, label, scale) for name, label, scale in OVERVIEW_METRICS
               if any(result.metric(name) is not None for result in results.values())]
    figure, axes = plt.subplots(figsize=(min(14.0, max(7.0, 0.4 * len(metrics) * max(1, len(results)))), 4.8))
    width = 0.8 / max(1, len(results))
    for offset, result in enumerate(results.values()):
        values = [(result.metric(name) or 0.0) / scale for name, _label, scale in metrics]
        positions = [i + (offset - (len(results) - 1) / 2) * width for i in range(len(metrics))]
        bars = axes.bar(positions, values, width, label=result.title)
        axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=6, rotation=90, padding=2)
    axes.set_xticks(range(len(metrics)), [label for _name, label, _scale in metrics])
    axes.set_ylim(0, 1.15)
    axes.set_ylabel("score (higher is better)")
    axes.set_title("Held-out metrics by model")
    axes.legend(fontsize=8, loc="upper right")
    return reports.png(figure, DPI)


def confusion_matrices(results: dict[str, ModelEvaluation]) -> bytes | None:
    """One confusion matrix per model (rows: reference, columns: answer; the last column: no label)."""
    with_labels = {key: result for key, result in results.items() if result.classification is not None}
    if not with_labels:
        return None
    plt = reports.pyplot()
    figure, axes_list = plt.subplots(1, len(with_labels), figsize=(3.6 * len(with_labels) + 0.6, 3.8),
                                     squeeze=False)
    for axes, result in zip(axes_list[0], with_labels.values(), strict=True):
        classification = result.classification
        assert classification is not None
        matrix = classification.confusion
        axes.imshow(matrix, cmap="Blues")
        columns = [*classification.labels, "(none)"]
        axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(len(classification.labels)), classification.labels, fontsize=7)
        darkest = max(max(values) for values in matrix) or 1
        for row, values in enumerate(matrix):
            for column, count in enumerate(values):
                axes.text(column, row, str(count), ha="center", va="center", fontsize=8,
                          color="white" if count > darkest / 2 else "black")
        axes.set_xlabel("answer")
        axes.set_ylabel("reference")
        axes.set_title(result.title, fontsize=9)
    return reports.png(figure, DPI)


def score_distribution(results: dict[str, ModelEvaluation], references: list[str]) -> bytes:
    """Per-example token F1 of each model, as box plots with every example's point."""
    plt = reports.pyplot()
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(results)), 4.2))
    series = [[token_f1(answer, reference) for answer, reference in zip(result.answers, references, strict=True)]
              for result in results.values()]
    axes.boxplot(series, showmeans=True)
    for index, values in enumerate(series, start=1):
        axes.scatter([index] * len(values), values, s=8, alpha=0.4)
    axes.set_xticks(range(1, len(results) + 1), [result.title for result in results.values()], rotation=15,
                    fontsize=8)
    axes.set_ylim(-0.05, 1.05)
    axes.set_ylabel("token F1 per example")
    axes.set_title("Per-example score distribution")
    return reports.png(figure, DPI)


def roc_curves(results: dict[str, ModelEvaluation]) -> bytes | None:
    """One-vs-rest ROC curves of each model that has label probabilities."""
    scored = {key: result for key, result in results.items()
              if result.classification is not None and result.classification.roc}
    if not scored:
        return None
    plt = reports.pyplot()
    figure, axes_list = plt.subplots(1, len(scored), figsize=(3.6 * len(scored) + 0.6, 3.6), squeeze=False)
    for axes, result in zip(axes_list[0], scored.values(), strict=True):
        assert result.classification is not None and result.classification.roc is not None
        for label, curve in result.classification.roc.items():
            if curve.auc is not None:
                axes.plot(curve.fpr, curve.tpr, label=f"{label} (AUC {curve.auc:.3f})")
        axes.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1)
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate")
        axes.set_title(result.title, fontsize=9)
        axes.legend(fontsize=7, loc="lower right")
    return reports.png(figure, DPI)
