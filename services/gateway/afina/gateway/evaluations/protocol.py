"""Request and response models of on-demand evaluations (an afina extension in OpenAI's style)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from afina.core.evaluation_jobs import JudgeSpec
from afina.core.training.request import NulFreeStr


class JudgeRequest(BaseModel):
    """Grade the answers with an LLM judge served by this gateway (the operator names the default judge)."""

    model_config = ConfigDict(extra="forbid")

    model: NulFreeStr | None = Field(None, description="the judge model: the operator's judge, or a base model "
                                                       "this gateway serves; default: the operator's judge")
    rubric: Annotated[NulFreeStr, Field(min_length=1, max_length=8000)] | None = Field(
        None, description="what the judge grades (the 1-5 scale is added); default: task, correctness, "
                          "faithfulness to the reference, and the question's language")


def _judge_flag(value: object) -> object:
    """``true`` is the operator's judge with the default rubric, ``false`` no judge (else the object as given)."""
    return {} if value is True else None if value is False else value


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
    judge: Annotated[JudgeRequest | None, BeforeValidator(_judge_flag)] = Field(
        None, description="true, or {model, rubric}: grade every answer with an LLM judge (a 1-5 score and a reason "
                          "per example); false or absent: no judge")


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
    judge: JudgeSpec | None = Field(None, description="the LLM judge's model and rubric, when asked for")
    result_files: list[str]
    automatic: bool = Field(description="the evaluation every export queues (its gate is the model's)")


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Evaluation]
