"""What the evaluation stage commits and the gateway, the CLI, the report and the model card read.

The evaluator scores several models on one job's held-out examples (the base model, the fine-tuned
model, every exported GGUF variant) and writes, under ``jobs/<tenant>/<job>/evaluation/``:

- one ``ModelEvaluation`` per model as soon as that model is done (``models/<key>.json``), so a worker
  killed mid-evaluation resumes without scoring a finished model again; each carries the
  ``fingerprint`` of what it was computed from, and a result for other inputs is computed afresh;
- the result files people read (summary CSV, predictions JSONL, charts, a Markdown/HTML section);
- ``EvaluationManifest`` (``evaluation.json``) LAST: every figure of every model, the train/held-out loss
  gap, the quality gate, and each result file with its size and sha256.

``QualityGate`` is also stored on the model's registry row (``models.quality_gate``): the gateway shows it
in ``/v1/models/{id}`` and refuses to serve a model whose gate failed while the operator enforces it.
Figures are kept exactly as computed (no rounding): a reader can see by how much a model passed or failed.

An optional LLM judge (``afina.evaluator.judge``) grades every answer against its reference with a rubric, through
the gateway; its per-example scores ride on ``ModelEvaluation.judge``, its mean and the count of examples it could
not score on ``ModelSummary.judge``, the model and rubric once on ``EvaluationManifest.judge``. Schema version 2
added these fields (all defaulted: a version-1 manifest reads as "no judge").
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.artifacts.manifest import FileEntry, Manifest
from afina.core.errors import ModelBlocked
from afina.core.quality_gate import CLASSIFICATION_METRICS, GateRules

EVALUATION_MANIFEST = "evaluation.json"
QUALITY_GATE_SCHEMA_VERSION = 1
JUDGE_MIN_SCORE, JUDGE_MAX_SCORE = 1, 5  # the judge's fixed scale (1: wrong or useless, 5: as good as the reference)

class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextMetrics(_Frozen):
    """Generated answers against the references, over the whole split (BLEU and chrF at corpus level, the
    others the mean of per-example scores), each in [0, 1] except BLEU and chrF (sacrebleu's 0–100)."""

    exact_match: float
    normalized_exact_match: float = Field(description="after Unicode NFKC, casefolding, punctuation removal and "
                                                      "whitespace collapsing (no language-specific article rule)")
    token_f1: float
    rouge_l: float = Field(description="F-measure of the longest common token subsequence")
    bleu: float
    chrf: float


class ClassMetrics(_Frozen):
    precision: float
    recall: float
    f1: float
    support: int = Field(ge=0, description="references of this class")


class RocCurve(_Frozen):
    """One class against the rest, from the model's label probabilities."""

    fpr: list[float]
    tpr: list[float]
    auc: float | None = Field(description="None when the split has no example of this class, or only this class")


class ClassificationMetrics(_Frozen):
    """When the answers come from a small label set: the answer is matched to a label after normalization."""

    labels: list[str]
    accuracy: float
    per_class: dict[str, ClassMetrics]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    confusion: list[list[int]] = Field(description="rows: reference label; columns: predicted label, then one "
                                                   "column for answers that are none of the labels")
    unmatched: int = Field(ge=0, description="answers that matched no label (counted wrong)")
    roc: dict[str, RocCurve] | None = Field(None, description="per class, when label probabilities were scored")
    macro_auc: float | None = None


class JudgeConfig(_Frozen):
    """Which judge graded the answers and how (once per evaluation)."""

    model: str = Field(description="the judge model, as the gateway serves it")
    rubric: str
    min_score: int = JUDGE_MIN_SCORE
    max_score: int = JUDGE_MAX_SCORE


class JudgeSummary(_Frozen):
    """One model's grades, without the per-example lists: never a mean that hides an unscored example."""

    mean: float | None = Field(description="the mean score over the scored examples; None when none was scored")
    scored: int = Field(ge=0)
    unscored: int = Field(ge=0, description="examples the judge could not score (failed call, invalid verdict)")
    error: str | None = Field(None, description="why the judge failed altogether (unreachable, misconfigured); "
                                                "the other metrics stand")


class JudgeResult(JudgeSummary):
    """One model's grades, per example (in split order)."""

    identity: str = Field(description="sha256 of the judge model, rubric, scale and prompt: grades made another "
                                      "way are made afresh")
    scores: list[int | None] = Field(description="per example, the score; None when unscored")
    reasons: list[str | None] = Field(description="per example, the judge's reason, or why it is unscored")

    def summary(self) -> JudgeSummary:
        return JudgeSummary(mean=self.mean, scored=self.scored, unscored=self.unscored, error=self.error)


class ModelEvaluation(Manifest):
    """One model's results on the split: written as soon as the model is done (the resume point)."""

    KIND: ClassVar[str] = "model evaluation"
    SCHEMA_VERSION: ClassVar[int] = 2  # 2: ``judge``

    key: str = Field(description="base, fine_tuned, or gguf:<variant>")
    kind: Literal["hf", "gguf"]
    title: str = Field(description="what a reader calls it: 'base (smollm2-135m-instruct)', 'Q4_K_M GGUF'")
    fingerprint: str = Field(description="sha256 of the inputs (examples, model files, settings): a result for "
                                         "other inputs is not reused")
    examples: int = Field(ge=1)
    loss: float | None = Field(description="mean negative log-likelihood (nats) of the reference answer tokens")
    perplexity: float | None
    scored_tokens: int = Field(ge=0)
    text: TextMetrics
    classification: ClassificationMetrics | None = None
    answers: list[str] = Field(description="the generated answer to each example, in split order")
    example_losses: list[float | None] = Field(description="per example, the reference's mean token loss")
    label_probabilities: list[dict[str, float]] | None = Field(None, description="per example, the probability "
                                                                                "of each label (classification)")
    train_loss: float | None = Field(None, description="the same loss on training examples (the fine-tuned "
                                                       "model: the train/held-out gap)")
    train_examples: int = Field(0, ge=0)
    seconds: float
    judge: JudgeResult | None = Field(None, description="the LLM judge's grades, when the evaluation asked for it")

    def metric(self, name: str) -> float | None:
        """The figure a rule or a table names (``METRIC_DIRECTIONS``); None where it was not computed."""
        if name in ("loss", "perplexity"):
            return getattr(self, name)
        if name in CLASSIFICATION_METRICS:
            if self.classification is None:
                return None
            return getattr(self.classification, name)
        return getattr(self.text, name)


class LossGap(_Frozen):
    """The fine-tuned model's loss on training examples against the held-out ones (same scoring)."""

    train_loss: float
    heldout_loss: float
    gap: float = Field(description="heldout_loss - train_loss")
    max_gap: float = Field(description="the operator's limit (AFINA_EVALUATION_OVERFIT_GAP)")
    overfitting: bool
    train_examples: int


class GateCheck(_Frozen):
    rule: Literal["not_worse_than_base", "variant_within_tolerance", "variant_perplexity_ratio"]
    model: str = Field(description="the model key checked")
    against: str = Field(description="the model key it is compared with")
    metric: str
    value: float | None
    reference: float | None
    limit: float
    passed: bool
    message: str


class QualityGate(_Frozen):
    """The gate's verdict: stored on the model row and in ``evaluation.json``."""

    schema_version: int = QUALITY_GATE_SCHEMA_VERSION
    passed: bool
    enforced: bool = Field(description="the operator enforces the gate: a failed one blocks serving")
    main_metric: str
    rules: GateRules
    checks: list[GateCheck]
    evaluation: str = Field(description="the evaluation manifest's key")
    evaluated_at: int

    @property
    def blocks_serving(self) -> bool:
        return self.enforced and not self.passed

    def failures(self) -> list[str]:
        return [check.message for check in self.checks if not check.passed]


class EvaluationManifest(Manifest):
    """``evaluation.json``: the evaluation's commit marker (written last)."""

    KIND: ClassVar[str] = "evaluation"
    SCHEMA_VERSION: ClassVar[int] = 2  # 2: ``judge`` here and on every model

    job_id: str = Field(description="the fine-tuning job evaluated")
    model: str = Field(description="the fine-tuned model's name")
    split: Literal["test", "validation", "file"] = Field(description="file: an uploaded file (every record)")
    examples: int = Field(ge=1)
    task: Literal["text", "classification"]
    labels: list[str] | None = None
    main_metric: str
    metrics: list[str] | None = Field(None, description="the metrics an on-demand evaluation asked for")
    file_id: str | None = None
    models: dict[str, ModelSummary] = Field(description="key -> figures, base first, then fine_tuned, then GGUFs")
    loss_gap: LossGap | None = None
    quality_gate: QualityGate
    files: dict[str, FileEntry] = Field(description="result file name -> its object")
    created_at: int
    judge: JudgeConfig | None = Field(None, description="the LLM judge, when the evaluation asked for it")


class ModelSummary(_Frozen):
    """A ``ModelEvaluation`` without its per-example lists."""

    kind: Literal["hf", "gguf"]
    title: str
    loss: float | None
    perplexity: float | None
    scored_tokens: int
    text: TextMetrics
    classification: ClassificationMetrics | None = None
    seconds: float
    judge: JudgeSummary | None = None

    @classmethod
    def of(cls, result: ModelEvaluation) -> ModelSummary:
        return cls(kind=result.kind, title=result.title, loss=result.loss, perplexity=result.perplexity,
                   scored_tokens=result.scored_tokens, text=result.text, classification=result.classification,
                   seconds=result.seconds, judge=result.judge.summary() if result.judge is not None else None)


EvaluationManifest.model_rebuild()


def refuse_blocked(model_name: str, quality_gate: dict[str, object] | None) -> None:
    """``ModelBlocked`` when the model's stored gate failed and the operator enforces it (a serving path calls
    this before it loads the model); a model never evaluated, or one whose gate passed, is served."""
    if not quality_gate:
        return
    gate = QualityGate.model_validate(quality_gate)
    if gate.blocks_serving:
        raise ModelBlocked(f"The model '{model_name}' failed its quality gate and the operator enforces it, so it is "
                           f"not served: {'; '.join(gate.failures())}", param="model")

