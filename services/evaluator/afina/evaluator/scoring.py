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

    # optional, for a scorer that does several examples at once (both of afina's do; ``_batched_scores``):
    # ``score_many(prompts, answers, max_new_tokens) -> [(greedy answer, [log-probabilities of each answer])]``,
    # the same figures as the calls above, one tuple per prompt; or only ``generate_many(prompts, max_new_tokens)``.


# examples a batching scorer (``score_many``/``generate_many``) takes at once, cancellation checked between. On the
# 2-core bench machine (bench/RESULTS.md) transformers gains up to 16; llama.cpp, bound by arithmetic there, is
# indifferent past 8. Each batch's llama.cpp KV cache holds 16 sequences of its longest prompt and answer.
GENERATION_BATCH = 16


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
    # a scorer that scores batches (``score_many``) does each example's whole work in batches first; one that only
    # answers in batches (``generate_many``) answers first; else, one example at a time: llama.cpp's single-sequence
    # path answers each prompt right after scoring it, while the prompt is still in its cache
    scored = _batched_scores(scorer, inputs, check_continue)
    batched = _batched_answers(scorer, inputs, check_continue) if scored is None else [a for a, _ in scored]
    answers: list[str] = batched or []
    for i, item in enumerate(inputs.examples):
        check_continue()
        label_answers = inputs.label_answers[i] if inputs.label_answers is not None else None
        if scored is not None:
            reference_logprobs, *label_logprobs = scored[i][1]
        else:
            reference_logprobs = scorer.token_logprobs(item.prompt_ids, item.answer_ids) if item.answer_ids else []
        nll, count = -sum(reference_logprobs), len(reference_logprobs)
        total_nll += nll
        total_tokens += count
        losses.append(nll / count if count else None)
        if batched is None:
            answers.append(scorer.generate(item.prompt_ids, inputs.max_new_tokens))
        if label_answers is not None:
            if scored is None:
                label_logprobs = [scorer.token_logprobs(item.prompt_ids, ids) for ids in label_answers.values()]
            probabilities.append(label_distribution(
                {label: sum(logprobs) for label, logprobs in zip(label_answers, label_logprobs, strict=True)}))
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


def _batches(inputs: ScoringInputs) -> list[list[int]]:
    """The examples' indices in batches of ``GENERATION_BATCH``, by prompt length: a batch of similar prompts
    carries less padding through transformers' forwards (the figures come back in the examples' order)."""
    order = sorted(range(len(inputs.examples)), key=lambda i: len(inputs.examples[i].prompt_ids))
    return [order[start:start + GENERATION_BATCH] for start in range(0, len(order), GENERATION_BATCH)]


def _batched_scores(scorer: Scorer, inputs: ScoringInputs,
                    check_continue: Callable[[], None]) -> list[tuple[str, list[list[float]]]] | None:
    """Per example (in the examples' order), its greedy answer and the log-probabilities of its reference and
    then of each label's answer, in batches, when the scorer scores batches (``score_many``); else None."""
    many = getattr(scorer, "score_many", None)
    if many is None:
        return None
    results: list[tuple[str, list[list[float]]] | None] = [None] * len(inputs.examples)
    for batch in _batches(inputs):
        check_continue()
        answers = [[inputs.examples[i].answer_ids,
                    *(inputs.label_answers[i].values() if inputs.label_answers is not None else ())] for i in batch]
        for i, result in zip(batch, many([inputs.examples[i].prompt_ids for i in batch], answers,
                                         inputs.max_new_tokens), strict=True):
            results[i] = result
    return [result for result in results if result is not None]


def _batched_answers(scorer: Scorer, inputs: ScoringInputs, check_continue: Callable[[], None]) -> list[str] | None:
    """Every example's greedy answer in batches, when the scorer decodes batches (``generate_many``); else None."""
    many = getattr(scorer, "generate_many", None)
    if many is None:
        return None
    answers: list[str] = [""] * len(inputs.examples)
    for batch in _batches(inputs):
        check_continue()
        for i, answer in zip(batch, many([inputs.examples[i].prompt_ids for i in batch], inputs.max_new_tokens),
                             strict=True):
            answers[i] = answer
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
