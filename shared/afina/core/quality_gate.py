"""The quality gate's rules and the metric names they may use.

Kept apart from ``afina.core.artifacts.evaluation`` (which reads and writes the store) so the settings
object can validate ``AFINA_QUALITY_GATE`` when it is read: a rule naming an unknown metric stops the
worker at start, not the first evaluation hours later.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# every metric a rule or a request may name, and whether a larger value is better
METRIC_DIRECTIONS: dict[str, Literal["higher", "lower"]] = {
    "loss": "lower", "perplexity": "lower",
    "exact_match": "higher", "normalized_exact_match": "higher", "token_f1": "higher", "rouge_l": "higher",
    "bleu": "higher", "chrf": "higher",
    "accuracy": "higher", "macro_precision": "higher", "macro_recall": "higher", "macro_f1": "higher",
    "macro_auc": "higher",
}
CLASSIFICATION_METRICS = frozenset({"accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc"})
AUTO_METRIC = "auto"


def check_metric_name(name: str, param: str = "main_metric") -> str:
    """``name`` when afina knows it (or ``auto``); ``ValueError`` listing the known names otherwise."""
    if name != AUTO_METRIC and name not in METRIC_DIRECTIONS:
        raise ValueError(f"{param} {name!r} is not a metric afina computes; known: {AUTO_METRIC}, "
                         f"{', '.join(sorted(METRIC_DIRECTIONS))}")
    return name


class GateRules(BaseModel):
    """The operator's quality-gate rules (``AFINA_QUALITY_GATE``, JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    main_metric: str = Field(AUTO_METRIC, description="auto: macro_f1 for a label task, token_f1 otherwise")
    min_gain_over_base: float = Field(0.0, description="the fine-tuned model's main metric minus the base's must "
                                                       "be at least this (0: not worse)")
    variant_tolerance: float = Field(0.05, ge=0.0, description="each quantized variant's main metric may be at "
                                                               "most this much worse than the f16 GGUF's")
    max_perplexity_ratio: float | None = Field(1.25, gt=0.0, description="a quantized variant's perplexity at "
                                                                         "most this times f16's (None: no rule)")
    enforce: bool = Field(False, description="a failed gate blocks serving (and Ollama/Hub publishing)")

    @field_validator("main_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return check_metric_name(value)
