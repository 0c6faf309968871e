"""Scoring one model on the examples: the loss of the references, generated answers, label probabilities.

A model is reached through a ``Scorer`` (transformers in ``hf``, llama.cpp in ``gguf``): two operations,
the log-probability of given answer tokens after a prompt, and a greedy answer. Everything else — losses,
perplexity, text and classification metrics, the train/held-out gap — is computed here the same way for
every model, so the figures of a transformers model and of its GGUF copies compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from afina.core.artifacts.evaluation import ModelEvaluation
from afina.evaluator.examples import TokenizedExample
from afina.evaluator.metrics.classification import classification_metrics
from afina.evaluator.metrics.text import text_metrics


class Scorer(Protocol):
    def token_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        """Natural-log probability of each answer token given the prompt and the answer tokens before it."""
        ...

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        """The greedy answer (special tokens dropped), up to the end of the turn or ``max_new_tokens``."""
        ...

    def close(self) -> None: ...


GENERATION_BATCH = 8  # prompts a scorer with ``generate_many`` answers at once (cancellation checked between)


@dataclass(frozen=True)
class ModelPlan:
    """One model to evaluate: its key, how to load it, and what identifies its weights (for the fingerprint)."""

    key: str
    kind: str
    title: str
    identity: str
    load: Callable[[], Scorer]


@dataclass(frozen=True)
class ScoringInputs:
    examples: list[TokenizedExample]
    labels: list[str] | None
    label_answers: list[dict[str, list[int]]] | None  # per example, each label's answer token ids
    train: list[TokenizedExample]  # scored only for the fine-tuned model
    max_new_tokens: int


def score_model(scorer: Scorer, plan: ModelPlan, inputs: ScoringInputs, *, fingerprint: str,
                check_continue: Callable[[], None], with_train: bool = False) -> ModelEvaluation:
    started = time.monotonic()
    references = [item.example.reference for item in inputs.examples]
    losses: list[float | None] = []
    probabilities: list[dict[str, float]] = []
    total_nll, total_tokens = 0.0, 0
    # a batching scorer answers everything first; llama.cpp answers each prompt right after scoring it, while
    # the prompt is still in its cache
    batched = _batched_answers(scorer, inputs, check_continue)
    answers: list[str] = batched or []
    for i, item in enumerate(inputs.examples):
        check_continue()
        nll, count = _nll(scorer, item)
        total_nll += nll
        total_tokens += count
        losses.append(nll / count if count else None)
        if batched is None:
            answers.append(scorer.generate(item.prompt_ids, inputs.max_new_tokens))
        if inputs.label_answers is not None:
            probabilities.append(label_distribution(
                {label: sum(scorer.token_logprobs(item.prompt_ids, ids))
                 for label, ids in inputs.label_answers[i].items()}))
    loss = total_nll / total_tokens if total_tokens else None
    train_loss = None
    if with_train and inputs.train:
        train_nll, train_tokens = 0.0, 0
        for item in inputs.train:
            check_continue()
            nll, count = _nll(scorer, item)
            train_nll, train_tokens = train_nll + nll, train_tokens + count
        train_loss = train_nll / train_tokens if train_tokens else None
    classification = (classification_metrics(answers, references, inputs.labels, probabilities or None)
                      if inputs.labels else None)
    return ModelEvaluation.build(
        key=plan.key, kind=plan.kind, title=plan.title, fingerprint=fingerprint, examples=len(inputs.examples),
        loss=loss, perplexity=math.exp(loss) if loss is not None else None, scored_tokens=total_tokens,
        text=text_metrics(answers, references), classification=classification, answers=answers,
        example_losses=losses, label_probabilities=probabilities or None, train_loss=train_loss,
        train_examples=len(inputs.train) if train_loss is not None else 0, seconds=time.monotonic() - started)


def _batched_answers(scorer: Scorer, inputs: ScoringInputs, check_continue: Callable[[], None]) -> list[str] | None:
    """Every example's greedy answer in batches, when the scorer decodes batches (``generate_many``); else None."""
    many = getattr(scorer, "generate_many", None)
    if many is None:
        return None
    answers: list[str] = []
    for start in range(0, len(inputs.examples), GENERATION_BATCH):
        check_continue()
        batch = inputs.examples[start:start + GENERATION_BATCH]
        answers += many([item.prompt_ids for item in batch], inputs.max_new_tokens)
    return answers


def _nll(scorer: Scorer, item: TokenizedExample) -> tuple[float, int]:
    if not item.answer_ids:
        return 0.0, 0
    logprobs = scorer.token_logprobs(item.prompt_ids, item.answer_ids)
    return -sum(logprobs), len(logprobs)


def label_distribution(logprobs: dict[str, float]) -> dict[str, float]:
    """Each label's probability among the labels (a softmax of the answers' total log-probabilities)."""
    top = max(logprobs.values())
    weights = {label: math.exp(value - top) for label, value in logprobs.items()}
    total = sum(weights.values())
    return {label: weight / total for label, weight in weights.items()}


def fit_context(item: TokenizedExample, n_ctx: int, reserve: int) -> TokenizedExample:
    """The example with its prompt cut from the left so prompt + max(answer, ``reserve``) fits ``n_ctx``."""
    room = n_ctx - max(len(item.answer_ids), reserve) - 1
    if len(item.prompt_ids) <= room:
        return item
    return TokenizedExample(example=item.example, prompt_ids=item.prompt_ids[-max(room, 1):],
                            answer_ids=item.answer_ids[:n_ctx - 2])
