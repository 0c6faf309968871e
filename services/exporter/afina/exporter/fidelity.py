"""The fidelity gate: every exported GGUF must answer like the model that was trained.

``verify.py`` checks that a GGUF is well formed (template, EOS, tokens, a sane answer); this module
checks that it is the *same model*. On held-out prompts, the merged transformers model's greedy
tokens are the reference; the f16 GGUF must give the same first ``tokens`` tokens on at least
``min_agreement`` of the prompts. Each quantized variant is compared with the f16 GGUF: its token
agreement (at least ``min_variant_agreement``) and its perplexity on validation texts as a multiple
of f16's (at most ``max_perplexity_ratio``).

Small held-out sets: a prompt whose tokens first differ at a near tie of the compared-with side (its
top-2 logits within ``near_tie_margin``, the token taken being its runner-up) still agrees — a 16-bit
copy rounds such a tie either way — and an agreement limit fails only once ``min_disagreements``
prompts (2) disagree beyond near ties: on 2 or 16 prompts, 95% is otherwise broken by one prompt.

Both sides get the SAME token ids: every prompt is rendered with the family's stock template and
tokenized once by the trained tokenizer, and those ids are fed to transformers and to llama.cpp
alike, so a template or tokenizer difference cannot pass for a model difference. Whether llama.cpp's
own tokenization of the rendered prompt gives the same ids is measured separately and reported.

One model is in memory at a time: the transformers model is freed before the first GGUF is loaded.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afina.core.artifacts.fidelity import (
    FidelityReport,
    FidelityTolerances,
    PromptMismatch,
    ReferenceFigures,
    VariantFidelity,
)
from afina.core.catalog import ChatFamily
from afina.core.errors import ExportFailed
from afina.exporter.verify import VERIFY_THREADS, load_hf_tokenizer

BASE_VARIANT = "f16"
DEFAULT_TOKENS = 32
# the fewest prompts that must disagree (beyond near ties) for an agreement limit to fail the export: with the
# default 16 held-out prompts (or the 2 of a tiny job) a 95% share is broken by ONE divergence, which a single
# prompt whose greedy path runs through a flat stretch of the distribution gives; two are evidence
MIN_DISAGREEMENTS = 2
MAX_PROMPT_TOKENS = 1024
MAX_TEXT_TOKENS = 512
LOGSUMEXP_ROWS = 64  # rows of logits turned into log-probabilities at once (bounds the float64 copy)

Messages = list[dict[str, Any]]


class FidelityFailed(ExportFailed):
    """A GGUF does not answer like the trained model within the tolerances; ``report`` has every figure."""

    code = "export_fidelity_failed"

    def __init__(self, message: str, *, report: FidelityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class EncodedPrompt:
    """A held-out chat as both sides see it: the rendered text and the trained tokenizer's ids for it."""

    rendered: str
    ids: list[int]  # the prompt fed to both models (its last ``max_prompt_tokens`` ids)
    full_ids: list[int]  # every id of the rendered prompt, for the tokenization check
    truncated: bool


@dataclass(frozen=True)
class Greedy:
    """One prompt's greedy tokens and, at each step, the runner-up token and the logits the winner led it by."""

    tokens: list[int]
    runner_ups: list[int]
    margins: list[float]


@dataclass(frozen=True)
class ModelRun:
    """What one model gave: its greedy tokens per prompt and its perplexity on the texts."""

    greedy: list[Greedy]
    perplexity: float | None
    seconds: float
    tokenization_mismatches: list[int]
    problems: list[str]

    @property
    def sequences(self) -> list[list[int]]:
        return [prompt.tokens for prompt in self.greedy]


def check_fidelity(*, merged_dir: Path, ggufs: dict[str, Path], family: ChatFamily, prompts: Sequence[Messages],
                   texts: Sequence[str], tokens: int = DEFAULT_TOKENS, min_agreement: float = 0.95,
                   min_variant_agreement: float, max_perplexity_ratio: float, near_tie_margin: float = 0.0,
                   min_disagreements: int = MIN_DISAGREEMENTS, threads: int | None = None,
                   max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_text_tokens: int = MAX_TEXT_TOKENS,
                   check_continue: Callable[[], None] | None = None) -> FidelityReport:
    """Measure every GGUF in ``ggufs`` (variant -> file, with ``"f16"``) against the merged model in ``merged_dir``.

    ``prompts`` are held-out chats (the job's test split, else validation; the first N), each ending where
    the assistant's answer would start; ``texts`` are validation conversations rendered with the stock
    template (for perplexity). Returns the report when every figure is within its limit; raises
    ``FidelityFailed`` (carrying the report) naming each variant, figure and limit otherwise. A prompt that
    first differs where the compared-with side's token led the one taken by at most ``near_tie_margin``
    logits counts as agreeing (0, the default: only exact ties); every such prompt is reported. An agreement
    limit fails the export only when at least ``min_disagreements`` prompts disagree beyond near ties (a
    share below the limit with fewer is a warning in the report).
    ``check_continue`` is called between prompts (cooperative cancellation).
    """
    tolerances = FidelityTolerances(tokens=tokens, min_agreement=min_agreement,
                                    min_variant_agreement=min_variant_agreement,
                                    max_perplexity_ratio=max_perplexity_ratio, near_tie_margin=near_tie_margin,
                                    min_disagreements=min_disagreements)
    if BASE_VARIANT not in ggufs:
        raise ExportFailed(f"the fidelity gate needs the f16 GGUF (got {sorted(ggufs)})")
    if not prompts:
        raise ExportFailed("the fidelity gate has no held-out prompts: the job has neither a test nor a validation "
                           "split with a chat to compare on")
    hf_tokenizer = load_hf_tokenizer(merged_dir, family.stock_template)
    encoded = [encode_prompt(hf_tokenizer, messages, max_prompt_tokens) for messages in prompts]
    text_ids = encode_texts(hf_tokenizer, texts, max_text_tokens)
    stop_ids = stop_token_ids(hf_tokenizer, family)
    threads = threads or VERIFY_THREADS

    reference_run, dtype = run_reference(merged_dir, encoded, text_ids, tokens=tokens, stop_ids=stop_ids,
                                         check_continue=check_continue)
    runs = {variant: run_gguf(ggufs[variant], encoded, text_ids, tokens=tokens, stop_ids=stop_ids, threads=threads,
                              check_continue=check_continue)
            for variant in _ordered(ggufs)}
    return judge(tolerances=tolerances, reference=reference_run, reference_dtype=dtype, runs=runs, ggufs=ggufs,
                 encoded=encoded, text_ids=text_ids)


def judge(*, tolerances: FidelityTolerances, reference: ModelRun, reference_dtype: str, runs: dict[str, ModelRun],
          ggufs: dict[str, Path], encoded: Sequence[EncodedPrompt], text_ids: Sequence[list[int]]) -> FidelityReport:
    """Turn the runs into figures, apply the limits, and raise ``FidelityFailed`` when any is broken.

    The agreement rule: a prompt agrees when its greedy tokens are the compared-with side's, or first differ at a
    near tie of that side (its top token led the one taken by at most ``near_tie_margin`` logits: the merged
    model's logits for f16, f16's for a quantized variant). A variant fails when its share of agreeing prompts is
    below the limit AND at least ``min_disagreements`` prompts disagree.
    """
    base = runs[BASE_VARIANT]
    n = len(encoded)
    variants: dict[str, VariantFidelity] = {}
    failures: list[str] = []
    warnings: list[str] = []
    for variant, run in runs.items():
        is_base = variant == BASE_VARIANT
        expected = reference if is_base else base
        mismatches = compare_sequences(expected.greedy, run.sequences, near_tie_margin=tolerances.near_tie_margin)
        agreement = (n - len(mismatches)) / n
        near_ties = sum(mismatch.near_tie for mismatch in mismatches)
        with_reference = (n - len(compare_sequences(reference.greedy, run.sequences))) / n
        ratio = None if run.perplexity is None or base.perplexity is None else run.perplexity / base.perplexity
        problems = list(run.problems)
        limit = tolerances.min_agreement if is_base else tolerances.min_variant_agreement
        disagreements = len(mismatches) - near_ties
        if (n - disagreements) / n < limit:
            against = "the trained model's" if is_base else "the f16 GGUF's"
            setting = "min_agreement" if is_base else "min_variant_agreement"
            ties = f"; {near_ties} more first differ at a near tie" if near_ties else ""
            shortfall = (f"the {variant} GGUF gives {against} first {tolerances.tokens} greedy tokens on "
                         f"{n - len(mismatches)}/{n} held-out prompts (agreement {agreement:.4g}{ties}); the "
                         f"limit is {setting} {limit:g}")
            if disagreements >= tolerances.min_disagreements:
                problems.append(shortfall)
            else:
                warnings.append(f"{shortfall}, tolerated: {disagreements} disagreeing prompt(s), and the gate fails "
                                f"from {tolerances.min_disagreements} (too few held-out prompts to tell one stray "
                                "divergence from a different model)")
        if not is_base and ratio is not None and ratio > tolerances.max_perplexity_ratio:
            problems.append(f"the {variant} GGUF's perplexity on the validation texts is {ratio:.4f}x the f16 "
                            f"GGUF's ({run.perplexity:.4f} vs {base.perplexity:.4f}); the limit is "
                            f"max_perplexity_ratio {tolerances.max_perplexity_ratio:g}")
        if run.tokenization_mismatches:
            warnings.append(f"llama.cpp tokenizes {len(run.tokenization_mismatches)}/{n} rendered prompts "
                            f"differently from the trained tokenizer with the {variant} GGUF (prompts "
                            f"{run.tokenization_mismatches[:10]}); clients that send text get other ids")
        failures.extend(problems)
        variants[variant] = VariantFidelity(
            variant=variant, file=ggufs[variant].name, compared_with="reference" if is_base else "f16",
            prompts_compared=n, agreement=agreement, near_ties=near_ties, mismatches=mismatches,
            agreement_with_reference=with_reference,
            tokenization_matches=n - len(run.tokenization_mismatches),
            tokenization_mismatches=run.tokenization_mismatches, perplexity=run.perplexity,
            perplexity_ratio=ratio, seconds=run.seconds, problems=problems)
    report = FidelityReport(
        passed=not failures, tolerances=tolerances, prompts=n,
        truncated_prompts=sum(prompt.truncated for prompt in encoded), texts=len(text_ids),
        perplexity_tokens=sum(len(ids) - 1 for ids in text_ids),
        reference=ReferenceFigures(dtype=reference_dtype, perplexity=reference.perplexity, seconds=reference.seconds),
        variants=variants, failures=failures, warnings=warnings)
    if failures:
        raise FidelityFailed("fidelity gate failed: " + "; ".join(failures), report=report)
    return report


def encode_prompt(hf_tokenizer: Any, messages: Messages, max_prompt_tokens: int) -> EncodedPrompt:
    """Render a chat with the stock template (generation prompt added) and tokenize it once."""
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_ids = [int(token) for token in hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    ids = full_ids[-max_prompt_tokens:]
    return EncodedPrompt(rendered=rendered, ids=ids, full_ids=full_ids, truncated=len(ids) < len(full_ids))


def encode_texts(hf_tokenizer: Any, texts: Sequence[str], max_text_tokens: int) -> list[list[int]]:
    """Token ids of each validation text (its first ``max_text_tokens``); texts of under 2 tokens predict nothing."""
    encoded = [[int(token) for token in hf_tokenizer(text, add_special_tokens=False)["input_ids"]][:max_text_tokens]
               for text in texts]
    return [ids for ids in encoded if len(ids) >= 2]


def stop_token_ids(hf_tokenizer: Any, family: ChatFamily) -> frozenset[int]:
    """The ids that end a turn: the family's stop strings that are single tokens, and the tokenizer's EOS."""
    vocab = hf_tokenizer.get_vocab()
    ids = {vocab[text] for text in (*family.stop, family.eos_token) if text in vocab}
    if hf_tokenizer.eos_token_id is not None:
        ids.add(int(hf_tokenizer.eos_token_id))
    return frozenset(ids)


def compare_sequences(expected: Sequence[Greedy], actual: Sequence[list[int]], *,
                      near_tie_margin: float = 0.0) -> list[PromptMismatch]:
    """The prompts whose sequences differ, each with its first differing position.

    Both sides stop after a stop token or ``tokens`` tokens, so equal sequences mean the same tokens and the
    same stop; a side that stopped earlier differs where its sequence ended (its token there is None). A
    mismatch is a near tie when the token taken is ``expected``'s runner-up there and its winner led it by at
    most ``near_tie_margin`` logits.
    """
    mismatches = []
    for index, (reference, tokens) in enumerate(zip(expected, actual, strict=True)):
        left = reference.tokens
        if left == tokens:
            continue
        position = next((at for at, (a, b) in enumerate(zip(left, tokens, strict=False)) if a != b),
                        min(len(left), len(tokens)))
        taken = tokens[position] if position < len(tokens) else None
        margin = reference.margins[position] if position < len(reference.margins) else None
        near_tie = (margin is not None and taken is not None and taken == reference.runner_ups[position]
                    and margin <= near_tie_margin)
        mismatches.append(PromptMismatch(prompt=index, position=position,
                                         expected=left[position] if position < len(left) else None,
                                         actual=taken, expected_margin=margin, near_tie=near_tie))
    return mismatches


def run_reference(merged_dir: Path, encoded: Sequence[EncodedPrompt], text_ids: Sequence[list[int]], *,
                  tokens: int, stop_ids: frozenset[int],
                  check_continue: Callable[[], None] | None = None) -> tuple[ModelRun, str]:
    """Greedy tokens and perplexity of the merged transformers model (CPU, in the dtype it was saved in)."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
    model.eval()
    dtype = str(model.dtype).removeprefix("torch.")
    try:
        with torch.inference_mode():
            greedy = []
            for prompt in encoded:
                if check_continue is not None:
                    check_continue()
                greedy.append(_hf_greedy(model, prompt.ids, tokens=tokens, stop_ids=stop_ids))
            perplexity = None
            if text_ids:
                total, count = 0.0, 0
                for ids in text_ids:
                    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().numpy()
                    total += negative_log_likelihood(logits, ids[1:])
                    count += len(ids) - 1
                perplexity = math.exp(total / count)
    finally:
        del model
        gc.collect()
    return ModelRun(greedy=greedy, perplexity=perplexity, seconds=round(time.monotonic() - started, 2),
                    tokenization_mismatches=[], problems=[]), dtype


def _hf_greedy(model: Any, ids: list[int], *, tokens: int, stop_ids: frozenset[int]) -> Greedy:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # filled in place by every forward
    output = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
    result = Greedy(tokens=[], runner_ups=[], margins=[])
    while True:
        best = torch.topk(output.logits[0, -1].float(), 2)
        token = int(torch.argmax(output.logits[0, -1]))  # the first of equal maxima, as numpy's argmax
        runner_up = int(best.indices[1]) if int(best.indices[0]) == token else int(best.indices[0])
        _record(result, token, runner_up, float(best.values[0] - best.values[1]))
        if token in stop_ids or len(result.tokens) == tokens:
            return result
        output = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1)


def _record(result: Greedy, token: int, runner_up: int, margin: float) -> None:
    result.tokens.append(token)
    result.runner_ups.append(runner_up)
    result.margins.append(margin)


def run_gguf(path: Path, encoded: Sequence[EncodedPrompt], text_ids: Sequence[list[int]], *, tokens: int,
             stop_ids: frozenset[int], threads: int, check_continue: Callable[[], None] | None = None) -> ModelRun:
    """Greedy tokens (fed the reference's ids), the tokenization check and the perplexity of one GGUF."""
    from llama_cpp import Llama

    started = time.monotonic()
    longest_prompt = max(len(prompt.ids) for prompt in encoded)
    longest_full = max(len(prompt.full_ids) for prompt in encoded)
    n_ctx = max(longest_prompt + tokens, longest_full)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                verbose=False)
    problems: list[str] = []
    try:
        largest_id = max(max(prompt.full_ids) for prompt in encoded)
        if largest_id >= llm.n_vocab():
            problems.append(f"{path.name} has a vocabulary of {llm.n_vocab()} tokens, which cannot hold the trained "
                            f"tokenizer's token {largest_id}: it is not this model")
            empty = [Greedy(tokens=[], runner_ups=[], margins=[]) for _ in encoded]
            return ModelRun(greedy=empty, perplexity=None, seconds=round(time.monotonic() - started, 2),
                            tokenization_mismatches=list(range(len(encoded))), problems=problems)
        tokenization_mismatches = [index for index, prompt in enumerate(encoded)
                                   if llm.tokenize(prompt.rendered.encode("utf-8"), add_bos=False, special=True)
                                   != prompt.full_ids]
        greedy = []
        for prompt in encoded:
            if check_continue is not None:
                check_continue()
            greedy.append(_llama_greedy(llm, prompt.ids, tokens=tokens, stop_ids=stop_ids))
    finally:
        llm.close()
    perplexity = gguf_perplexity(path, text_ids, threads=threads, check_continue=check_continue) if text_ids else None
    return ModelRun(greedy=greedy, perplexity=perplexity, seconds=round(time.monotonic() - started, 2),
                    tokenization_mismatches=tokenization_mismatches, problems=problems)


def _llama_greedy(llm: Any, ids: list[int], *, tokens: int, stop_ids: frozenset[int]) -> Greedy:
    import llama_cpp

    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(ids)
    result = Greedy(tokens=[], runner_ups=[], margins=[])
    while True:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
        token = int(np.argmax(logits))
        top = float(logits[token])
        logits[token] = -np.inf
        runner_up = int(np.argmax(logits))
        _record(result, token, runner_up, top - float(logits[runner_up]))
        if token in stop_ids or len(result.tokens) == tokens:
            return result
        llm.eval([token])


def gguf_perplexity(path: Path, text_ids: Sequence[list[int]], *, threads: int,
                    check_continue: Callable[[], None] | None = None) -> float:
    """Perplexity of a GGUF on the texts: every position's next-token log-probability, over all texts."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(len(ids) for ids in text_ids), n_threads=threads,
                n_threads_batch=threads, logits_all=True, seed=0, verbose=False)
    try:
        total, count = 0.0, 0
        for ids in text_ids:
            if check_continue is not None:
                check_continue()
            llm.reset()
            llm.eval(ids)
            total += negative_log_likelihood(llm.scores[:len(ids) - 1], ids[1:])
            count += len(ids) - 1
    finally:
        llm.close()
    return math.exp(total / count)


def negative_log_likelihood(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Sum over rows of -log softmax(row)[target], in float64 (rows taken a block at a time)."""
    total = 0.0
    for start in range(0, len(targets), LOGSUMEXP_ROWS):
        block = np.asarray(logits[start:start + LOGSUMEXP_ROWS], dtype=np.float64)
        wanted = np.asarray(targets[start:start + LOGSUMEXP_ROWS])
        peak = block.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(block - peak).sum(axis=1))
        total += float((log_norm - block[np.arange(len(wanted)), wanted]).sum())
    return total


def _ordered(ggufs: dict[str, Path]) -> list[str]:
    return [BASE_VARIANT, *[variant for variant in ggufs if variant != BASE_VARIANT]]
