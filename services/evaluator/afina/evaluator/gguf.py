"""An exported GGUF variant through llama.cpp in process (``llama-cpp-python``), as the gateway serves it.

The same token ids as the transformers models are fed in (no re-tokenization), so a variant's loss is
comparable with the fine-tuned model's; log-probabilities are taken from llama.cpp's logits in float64.

Two paths:

- one example at a time (``token_logprobs``, ``generate``): a context of one sequence with the logits of every
  position (``logits_all``); an example's prompt is evaluated once for its reference, its answer and each label,
  which continue from the cached prompt (``generate`` then re-evaluates the prompt's last token alone, which
  llama.cpp's kernels round differently from a whole prompt's: on a near tie its answer can differ from a fresh
  context's);
- several examples at once (``score_many``, ``generate_many``): a second context on the same weights holds one
  KV sequence per example. Each prompt is evaluated once, together with its first answer; the other answers
  continue from it; then every greedy step is one ``llama_decode`` of one token per unfinished sequence, so the
  weights are read once a step for the whole batch instead of once per example. It is made on first use, sized
  for the batch (sequences x the longest prompt and answer, in steps of 256 tokens), and grows when a batch
  needs more: on SmolLM2-135M, a batch of 16 (16 sequences of 256 tokens) added 135 MB of resident memory
  (``bench/RESULTS.md``). Its answers and log-probabilities are those of one call at a time from a fresh context,
  bit for bit (see ``_score_answers``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTEXT_ALIGN = 256  # the batched context's room per sequence grows in steps of this many tokens
MULTIBYTE_SLACK = 4  # tokens an answer may run past its limit to finish a UTF-8 character


@dataclass
class _Sequence:
    """One example in the batched context: its KV sequence, its answers' log-probabilities, its greedy answer."""

    seq: int
    prompt: list[int]
    answers: list[list[int]]
    limit: int  # the most tokens it may generate: max_new_tokens, less where the context has no room for them
    logprobs: list[list[float]] = field(default_factory=list)
    prompt_logits: Any = None  # the logits after the prompt: each answer's first token, the first greedy token
    tokens: list[int] = field(default_factory=list)
    next_pos: int = 0  # where the last generated token goes when it is fed back
    multibyte_hold: int = 0
    done: bool = False


class GgufScorer:
    def __init__(self, path: Path, n_ctx: int, threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.n_ctx = n_ctx
        threads = threads or max(1, (os.cpu_count() or 2))
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                         n_threads=threads, n_threads_batch=threads)
        self._batched: Any = None  # the batched context, made on first use
        self._batched_shape = (0, 0)  # its (sequences, room per sequence)
        self._batch: Any = None  # its llama_batch
        self._batch_capacity = 0

    def token_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        import numpy as np

        self._eval_reusing_prefix(prompt_ids + answer_ids)
        start = len(prompt_ids) - 1
        return _logprobs(np.asarray(self.llm.scores[start:start + len(answer_ids)], dtype=np.float64), answer_ids)

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

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """What ``generate`` answers to each prompt, decoded together (see ``score_many``)."""
        return [answer for answer, _ in self.score_many(prompts, [[] for _ in prompts], max_new_tokens)]

    def score_many(self, prompts: list[list[int]], answers: list[list[list[int]]],
                   max_new_tokens: int) -> list[tuple[str, list[list[float]]]]:
        """Per prompt, its greedy answer and the log-probabilities of each of its ``answers`` (what ``generate``
        and ``token_logprobs`` give), the prompts evaluated and answered together in the batched context.

        A greedy answer stops at an end-of-generation token of the vocabulary or after ``max_new_tokens``
        (fewer where prompt and answer would not fit ``n_ctx``), like ``generate``: an answer cut inside a UTF-8
        character goes on until the character is whole (llama-cpp-python's rule) and its text drops special tokens
        and surrounding space. A sequence that stops early leaves the batch; the others go on. A prompt of
        ``n_ctx`` tokens or more is refused with ``ValueError``, as ``generate`` refuses it.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompt(s) but answers for {len(answers)}")
        for prompt, own in zip(prompts, answers, strict=True):
            if not prompt:
                raise ValueError("an empty prompt has no position to answer from")
            if len(prompt) >= self.n_ctx:
                raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {self.n_ctx}")
            if any(len(prompt) + len(answer) > self.n_ctx for answer in own):
                raise ValueError(f"a prompt of {len(prompt)} tokens and its answer exceed the context window of "
                                 f"{self.n_ctx}")
        if not prompts:
            return []
        sequences = [_Sequence(seq=i, prompt=prompt, answers=own, next_pos=len(prompt),
                               limit=min(max_new_tokens, self.n_ctx - len(prompt)))
                     for i, (prompt, own) in enumerate(zip(prompts, answers, strict=True))]
        room = max(len(s.prompt) + max([s.limit + MULTIBYTE_SLACK, *map(len, s.answers)]) for s in sequences)
        ctx = self._batched_context(len(sequences), min(self.n_ctx, room))
        self._memory_call("llama_memory_clear", True)
        self._score_answers(ctx, sequences)
        self._greedy(ctx, sequences)
        return [(self.llm.detokenize(s.tokens, special=False).decode("utf-8", errors="ignore").strip(), s.logprobs)
                for s in sequences]

    def _score_answers(self, ctx: Any, sequences: list[_Sequence]) -> None:
        """Evaluate each prompt with its first answer, then each further answer continuing from the prompt, keeping
        the logits after the prompt for the greedy answer.

        Each evaluation is its own ``llama_decode`` of one sequence, cut where ``Llama.eval`` cuts it (every
        ``n_batch`` tokens from the first it evaluates) and with the logits of every position, exactly as the
        single-sequence context (``logits_all``) computes them: llama.cpp's CPU kernels round differently for a
        different number of rows (one call mixing sequences of unequal lengths is split into other row counts), and
        a greedy answer can turn on the last bits of a near tie. The batch pays in the decoding steps: prompt
        evaluation already multiplies matrices of many rows."""
        import numpy as np

        for s in sequences:
            for index, answer in enumerate(s.answers or [[]]):
                tokens = (s.prompt if index == 0 else []) + answer
                first = 0 if index == 0 else len(s.prompt)
                logits = []
                for start in range(0, len(tokens), self._batch_capacity):
                    chunk = tokens[start:start + self._batch_capacity]
                    logits += self._submit_all(ctx, [(token, first + start + i, s.seq, True)
                                                     for i, token in enumerate(chunk)])
                if index == 0:
                    s.prompt_logits = logits[len(s.prompt) - 1]
                    logits = logits[len(s.prompt):]
                if s.answers:
                    rows = np.asarray([s.prompt_logits, *logits[:len(answer) - 1]], dtype=np.float64)
                    s.logprobs.append(_logprobs(rows, answer) if answer else [])
                if answer:
                    self._memory_call("llama_memory_seq_rm", s.seq, len(s.prompt), -1)

    def _greedy(self, ctx: Any, sequences: list[_Sequence]) -> None:
        """Greedy answers from the prompts' logits: one token per unfinished sequence a step, in one call."""
        import llama_cpp
        import numpy as np

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        held_room = self._batched_shape[1]

        def take(s: _Sequence, logits: Any) -> None:
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                s.done = True
                return
            s.tokens.append(token)
            # create_completion's rule: a lead byte among the text's last three whose character is not whole yet
            # holds the answer open past its limit, one token per byte still missing
            for index, byte in enumerate(self.llm.detokenize(s.tokens, special=False)[-3:]):
                waiting = 3 - index
                for length, pattern in ((2, 0xC0), (3, 0xE0), (4, 0xF0)):
                    if length > waiting and byte & pattern == pattern:
                        s.multibyte_hold = length - waiting
            if s.multibyte_hold > 0:
                s.multibyte_hold -= 1
                s.done = s.next_pos >= held_room
                return
            s.done = len(s.tokens) >= s.limit

        for s in sequences:
            take(s, s.prompt_logits)
        while live := [s for s in sequences if not s.done]:
            rows = self._submit_all(ctx, [(s.tokens[-1], s.next_pos, s.seq, True) for s in live])
            for s, logits in zip(live, rows, strict=True):
                s.next_pos += 1
                take(s, logits)
                if s.done:
                    self._memory_call("llama_memory_seq_rm", s.seq, -1, -1)

    def _submit_all(self, ctx: Any, entries: list[tuple[int, int, int, bool]]) -> list[Any]:
        """``llama_decode`` of (token, position, sequence, wants logits) entries, as many a call as the batch
        holds; the logits asked for, in order (copies: the next call overwrites llama.cpp's buffer)."""
        import llama_cpp
        import numpy as np

        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))
        batch, out = self._batch, []
        for start in range(0, len(entries), self._batch_capacity):
            chunk = entries[start:start + self._batch_capacity]
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(chunk)
            status = llama_cpp.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status} on {len(chunk)} token(s)")
            out += [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                    for i, (*_, logits) in enumerate(chunk) if logits]
        return out

    def _memory_call(self, name: str, *args: Any) -> Any:
        import llama_cpp

        return getattr(llama_cpp, name)(llama_cpp.llama_get_memory(self._batched), *args)

    def _batched_context(self, sequences: int, room: int) -> Any:
        """The batched context: ``sequences`` KV sequences of ``room`` tokens each (not one shared cache:
        unrelated prompts attend only to their own cells), made again, larger, only when a batch needs more.
        It shares the weights of ``self.llm`` and copies its settings (attention kernel, KV types, threads),
        so it computes what ``generate`` computes; it costs its KV cache and compute buffers."""
        import llama_cpp

        held_sequences, held_room = self._batched_shape
        if self._batched is not None and sequences <= held_sequences and room <= held_room:
            return self._batched
        self._free_batched()
        sequences = max(sequences, held_sequences)
        room = min(self.n_ctx, -(-max(room, held_room) // CONTEXT_ALIGN) * CONTEXT_ALIGN)
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_ctx = sequences * room
        params.n_seq_max = sequences
        params.kv_unified = False
        params.n_batch = params.n_ubatch = min(512, params.n_ctx)
        ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if ctx is None:
            raise RuntimeError(f"llama.cpp could not make a context of {sequences} sequences x {room} tokens")
        self._batched, self._batched_shape = ctx, (sequences, room)
        self._batch_capacity = params.n_batch
        self._batch = llama_cpp.llama_batch_init(self._batch_capacity, 0, 1)
        return ctx

    def _free_batched(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._batched is not None:
            llama_cpp.llama_free(self._batched)
            self._batched = None

    def close(self) -> None:
        self._free_batched()  # before the model it was made on
        self.llm.close()


def _logprobs(logits: Any, answer_ids: list[int]) -> list[float]:
    """Natural-log softmax probability of each answer token, from the float64 logits of the position before it."""
    import numpy as np

    top = logits.max(axis=1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    chosen = logits[np.arange(len(answer_ids)), np.asarray(answer_ids)]
    return (chosen - logsumexp).tolist()
