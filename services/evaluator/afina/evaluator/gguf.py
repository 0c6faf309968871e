"""An exported GGUF variant through llama.cpp in process (``llama-cpp-python``), as the gateway serves it.

The same token ids as the transformers models are fed in (no re-tokenization), so a variant's loss is
comparable with the fine-tuned model's; log-probabilities are taken from llama.cpp's logits of every
position (``logits_all``) in float64. An example's prompt is evaluated once: the reference, the greedy
answer and each label continue from the cached prompt (``bench/`` measures what that saves).
"""

from __future__ import annotations

import os
from pathlib import Path


class GgufScorer:
    def __init__(self, path: Path, n_ctx: int, threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                         n_threads=threads or max(1, (os.cpu_count() or 2)))

    def token_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        import numpy as np

        self._eval_reusing_prefix(prompt_ids + answer_ids)
        start = len(prompt_ids) - 1
        logits = np.asarray(self.llm.scores[start:start + len(answer_ids)], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        chosen = logits[np.arange(len(answer_ids)), np.asarray(answer_ids)]
        return (chosen - logsumexp).tolist()

    def _eval_reusing_prefix(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` keeping what the context already holds of them: an example's prompt is evaluated
        once for its reference, its answer and each label (``eval`` drops the cache past ``n_tokens``; the
        logits of the kept positions stay valid)."""
        cached = self.llm.input_ids[:self.llm.n_tokens]
        common = 0
        for held, wanted in zip(cached, tokens, strict=False):
            if held != wanted:
                break
            common += 1
        self.llm.n_tokens = common
        if common < len(tokens):
            self.llm.eval(tokens[common:])

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        # no reset: llama-cpp-python's generate reuses the cached prompt prefix the same way
        completion = self.llm.create_completion(prompt=prompt_ids, max_tokens=max_new_tokens, temperature=0.0,
                                                top_k=1)
        return str(completion["choices"][0]["text"]).strip()  # type: ignore[index]

    def close(self) -> None:
        self.llm.close()
