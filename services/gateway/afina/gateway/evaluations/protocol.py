"""Request and response models of on-demand evaluations (an afina extension in OpenAI's style)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.core.training.request import NulFreeStr


class EvaluationRequest(BaseModel):
    """What to evaluate on and how; every field optional (the job's held-out split, every model, every metric)."""

    model_config = ConfigDict(extra="forbid")

    file: NulFreeStr | None = Field(None, description="an uploaded fine-tune file (processed) in the format of the "
                                                      "job's training data; default: the job's held-out split")
    models: list[NulFreeStr] | None = Field(None, description="which to score: base, fine_tuned, or a GGUF "
                                                              "variant (f16, q8_0, q4_k_m, ...); default: all")
    metrics: list[NulFreeStr] | None = Field(None, description="the metrics to report, the first the main one "
                                                               "(loss, perplexity, exact_match, token_f1, rouge_l, "
                                                               "bleu, chrf, accuracy, macro_f1, macro_auc, ...)")
    labels: list[NulFreeStr] | None = Field(None, description="the label set the answers come from (else "
                                                              "detected from the references)")


class Evaluation(BaseModel):
    """An evaluation: a tracked job (its events at ``/v1/fine_tuning/jobs/{id}/events``)."""

    id: str
    object: Literal["fine_tuning.job.evaluation"] = "fine_tuning.job.evaluation"
    fine_tuning_job_id: str
    model: str
    status: str
    created_at: int
    finished_at: int | None
    error: dict[str, Any] | None
    file: str | None
    models: list[str] | None
    metrics: list[str] | None
    result_files: list[str]
    automatic: bool = Field(description="the evaluation every export queues (its gate is the model's)")


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Evaluation]
