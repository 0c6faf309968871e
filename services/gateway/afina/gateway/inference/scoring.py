"""Token log probabilities from llama.cpp in process, for ``/v1/completions``' ``logprobs`` and ``echo``.

llama.cpp keeps the logits of every position only in a context made with ``logits_all`` (a buffer of
n_ctx x vocabulary floats: ~200 MB for SmolLM2 at n_ctx 1024, ~1 GB for a 128k-vocabulary model at
2048), and computing them costs the output projection for every prompt token instead of the last. So
the in-process backend loads such a context only for a request that asks (its own pool slot, like
embeddings), and ordinary chats never pay for it.

The prompt is scored here rather than by llama-cpp-python's ``echo``: that pairs each token with the
logits of the position *after* it when the model adds no BOS token (SmolLM2 and most chat models), and
its ``max_tokens`` 0 means "until the context is full", not "score only". The answer's own tokens
come from llama-cpp-python's completion logprobs, which pair them correctly.
"""

from __future__ import annotations

from typing import Any

from afina.gateway.inference.base import TokenLogprobs


def prompt_tokens(llm: Any, prompt: str) -> list[int]:
    """The prompt's tokens as llama-cpp-python's completion makes them (BOS when the model adds one)."""
    return llm.tokenize(prompt.encode("utf-8"), special=True)


def score_prompt(llm: Any, tokens: list[int], top: int, *, listed_bos: bool = False) -> TokenLogprobs:
    """Each prompt token's log probability given the tokens before it, and the ``top`` likeliest tokens at its
    position (the token itself added, as OpenAI does). A BOS llama.cpp added is not the caller's text and is
    not listed (``listed_bos``: the caller gave the ids, every one is listed, so a harness's token counts
    line up); the first listed token's probability is None unless a BOS precedes it (nothing conditions it)."""
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    peak = logits.max(axis=1, keepdims=True)
    logprobs = logits - (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))
    start = 1 if not listed_bos and tokens and tokens[0] == llm.token_bos() and _adds_bos(llm) else 0
    listed = TokenLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    text = b""
    for position in range(start, len(tokens)):
        token = tokens[position]
        before = tokens[:position]
        piece = llm.detokenize([token], prev_tokens=before)
        listed.text_offset.append(len(text.decode("utf-8", errors="ignore")))
        text += piece
        listed.tokens.append(piece.decode("utf-8", errors="ignore"))
        if position == 0:
            listed.token_logprobs.append(None)
            listed.top_logprobs.append(None)
            continue
        row = logprobs[position - 1]
        listed.token_logprobs.append(float(row[token]))
        listed.top_logprobs.append(_top(llm, row, top, before, token))
    return listed


def _top(llm: Any, row: Any, top: int, before: list[int], token: int) -> dict[str, float]:
    import numpy as np

    alternatives: dict[str, float] = {}
    if top > 0:
        best = np.argpartition(row, -top)[-top:]
        for candidate in best[np.argsort(row[best])[::-1]]:
            text = llm.detokenize([int(candidate)], prev_tokens=before).decode("utf-8", errors="ignore")
            alternatives.setdefault(text, float(row[candidate]))
    own = llm.detokenize([token], prev_tokens=before).decode("utf-8", errors="ignore")
    alternatives[own] = float(row[token])
    return alternatives


def _adds_bos(llm: Any) -> bool:
    """Whether llama.cpp put the BOS there itself (then it is not part of the caller's text)."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    except (AttributeError, ImportError):
        return True


def completion_logprobs(choice: dict[str, Any], *, shift: int = 0) -> TokenLogprobs:
    """The answer's own tokens, from a llama-cpp-python completion made with ``logprobs`` (``echo`` off), their
    offsets moved by ``shift`` characters."""
    scored = TokenLogprobs.from_openai(choice.get("logprobs"))
    if scored is None:
        return TokenLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    return TokenLogprobs(tokens=scored.tokens, token_logprobs=scored.token_logprobs, top_logprobs=scored.top_logprobs,
                         text_offset=[offset + shift for offset in scored.text_offset])
