"""``score_model``'s batched paths: a scorer with ``score_many`` does every example's work in batches of
``GENERATION_BATCH`` sorted by prompt length, and the figures come back in the examples' order, equal to the
one-call-at-a-time figures of the same scorer."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from afina.evaluator.examples import Example, TokenizedExample
from afina.evaluator.scoring import GENERATION_BATCH, ModelPlan, ScoringInputs, score_model


@dataclass
class Arithmetic:
    """Answers and log-probabilities that are functions of the ids alone, so a mixed-up order shows."""

    batches: list[list[int]] = field(default_factory=list)

    def token_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        return [-(prompt_ids[0] + token) / 100 for token in answer_ids]

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        return f"answer {prompt_ids[0]} ({len(prompt_ids)} tokens, {max_new_tokens} new)"

    def close(self) -> None: ...


@dataclass
class BatchedArithmetic(Arithmetic):
    def score_many(self, prompts: list[list[int]], answers: list[list[list[int]]],
                   max_new_tokens: int) -> list[tuple[str, list[list[float]]]]:
        self.batches.append([len(prompt) for prompt in prompts])
        return [(self.generate(prompt, max_new_tokens), [self.token_logprobs(prompt, answer) for answer in own])
                for prompt, own in zip(prompts, answers, strict=True)]


def _inputs(count: int, *, labels: bool) -> ScoringInputs:
    # prompt lengths out of order: 7, 2, 9, 4, ...; example i's prompt starts with the id i
    examples = [TokenizedExample(example=Example(prompt=[{"role": "user", "content": str(i)}],
                                                 reference="sim" if i % 2 else "não"),
                                 prompt_ids=[i] + [1] * ((i * 7) % 11), answer_ids=[5, 6][:1 + i % 2])
                for i in range(count)]
    return ScoringInputs(examples=examples, labels=["não", "sim"] if labels else None,
                         label_answers=[{"não": [3], "sim": [4, 4]} for _ in examples] if labels else None,
                         train=[], max_new_tokens=5)


@pytest.mark.parametrize("labels", [False, True])
def test_batched_figures_equal_one_at_a_time_in_the_examples_order(labels: bool) -> None:
    inputs = _inputs(GENERATION_BATCH + 3, labels=labels)
    plan = ModelPlan(key="m", kind="gguf", title="m", identity="m", load=Arithmetic)
    scorer = BatchedArithmetic()
    batched = score_model(scorer, plan, inputs, fingerprint="f", check_continue=lambda: None)
    sequential = score_model(Arithmetic(), plan, inputs, fingerprint="f", check_continue=lambda: None)
    assert batched.answers == sequential.answers and batched.answers[3].startswith("answer 3 ")
    assert batched.example_losses == sequential.example_losses
    assert batched.loss == sequential.loss and batched.scored_tokens == sequential.scored_tokens
    assert batched.label_probabilities == sequential.label_probabilities
    assert (batched.label_probabilities is not None) == labels
    # batches of GENERATION_BATCH, the shortest prompts first
    assert [len(batch) for batch in scorer.batches] == [GENERATION_BATCH, 3]
    lengths = [length for batch in scorer.batches for length in batch]
    assert lengths == sorted(lengths) and lengths != [len(e.prompt_ids) for e in inputs.examples]

