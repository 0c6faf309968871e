"""llama.cpp inside the gateway process: the embedded default.

A llama.cpp context is not thread-safe, so each loaded model has one lock and every
call into it runs in a worker thread while holding that lock; a stream holds it
from the first token to the last. Which models stay loaded, and for how long, is the
``LoadedPool``'s book (``pool.py``). A model is loaded once per context length, once
more for embeddings (llama.cpp embeds only with a context made for it) and once more for
token log probabilities (a context keeping every position's logits: ``scoring.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio import to_thread

from afina.core.catalog.template_refusal import first_refused_message, template_refusal
from afina.core.errors import InferenceUnavailable, InvalidRequest
from afina.core.logging import log_event
from afina.core.settings import Settings
from afina.gateway.inference import scoring
from afina.gateway.inference.base import (
    Embeddings,
    Generation,
    GenerationRequest,
    LoadedModel,
    ServedModel,
    TextDelta,
    TokenLogprobs,
    input_too_long,
)
from afina.gateway.inference.grammar import grammar_for
from afina.gateway.inference.pool import LoadedPool, Slot
from afina.gateway.inference.templates import gguf_template_renderer

log = logging.getLogger("afina.gateway.inference")
_END = object()


def _metered_llama_class() -> type:
    """``llama_cpp.Llama`` counting the tokens of the last call, which its stream chunks do not report.

    ``generate`` receives the whole prompt and yields every sampled token; the end-of-generation
    token is not part of the completion, as in llama.cpp's own non-stream ``usage``.
    """
    import llama_cpp

    class MeteredLlama(llama_cpp.Llama):
        last_prompt_tokens = 0
        last_completion_tokens = 0

        def generate(self, tokens, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
            self.last_prompt_tokens = len(tokens)
            self.last_completion_tokens = 0
            for token in super().generate(tokens, *args, **kwargs):
                if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                    self.last_completion_tokens += 1
                yield token

    return MeteredLlama


@dataclass
class _Context:
    """A loaded model and the lock that lets one call at a time into its llama.cpp context."""

    llm: Any
    lock: asyncio.Lock


class InProcessBackend:
    """A pool of ``llama_cpp.Llama`` objects, called from worker threads one call per model at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._llama_class: type | None = None
        self._pool: LoadedPool[_Context] = LoadedPool(capacity=settings.max_loaded_models,
                                                      keep_alive_s=settings.keep_alive_s, open=self._open,
                                                      close=self._close)

    def _load(self, slot: Slot) -> Any:
        from jinja2 import TemplateError

        if self._llama_class is None:
            self._llama_class = _metered_llama_class()
        extra: dict[str, Any] = {"logits_all": True} if slot.logits_all else {}
        if slot.embedding:
            import llama_cpp

            # a causal model has no pooling of its own: the mean of its token states, as Ollama serves it
            extra = {"embedding": True, "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
        try:
            return self._llama_class(model_path=str(slot.path), n_ctx=slot.n_ctx,
                                     n_threads=self.settings.inference_threads, verbose=False, **extra)
        except (ValueError, RuntimeError, TemplateError) as exc:  # TemplateError: a chat template that won't compile
            raise InferenceUnavailable(f"could not load model file {slot.path.name}: {exc}") from None

    async def _open(self, slot: Slot, model: ServedModel) -> _Context:
        log_event(log, "model.loading", model=model.name, n_ctx=slot.n_ctx, embedding=slot.embedding)
        return _Context(llm=await to_thread.run_sync(self._load, slot), lock=asyncio.Lock())

    @staticmethod
    async def _close(context: _Context) -> None:
        await to_thread.run_sync(context.llm.close)

    def _slot(self, model: ServedModel, num_ctx: int | None, *, embedding: bool = False,
              logits_all: bool = False) -> Slot:
        return Slot.of(model, num_ctx, self.settings.inference_n_ctx, embedding=embedding, logits_all=logits_all)

    # --- generation ------------------------------------------------------------------------------

    def _call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        options = request.sampling.set_fields()
        if "max_tokens" not in options:
            options["max_tokens"] = None  # until the model stops or the context is full (create_completion's is 16)
        elif options["max_tokens"] < 0:  # Ollama's num_predict -1 (no limit) and -2 (fill the context)
            options["max_tokens"] = None
        grammar = grammar_for(request.output_format)
        if grammar is not None:
            options["grammar"] = grammar
        if request.messages is not None:
            return {"messages": request.messages, **options}
        if request.logprobs is not None:
            options["logprobs"] = request.logprobs
        if request.echo:
            options["echo"] = True
        return {"prompt": request.prompt, **options}

    async def generate(self, request: GenerationRequest) -> Generation:
        scored = request.scored or (request.prompt is not None and request.sampling.max_tokens == 0)
        slot = self._slot(request.model, request.num_ctx, logits_all=request.logprobs is not None)
        entry, load_ns = await self._pool.acquire(slot, request.model)
        loaded = entry.handle
        try:
            async with loaded.lock:
                started = time.perf_counter_ns()
                call = _scored_call if scored else _call
                result = await to_thread.run_sync(call, loaded.llm, self._call_kwargs(request))
                elapsed = time.perf_counter_ns() - started
        finally:
            await self._pool.release(slot, entry, request.keep_alive_s)
        if scored:
            return replace(result, load_ns=load_ns, eval_ns=elapsed)
        choice = result["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = result.get("usage") or {}
        timings = _split_timing(loaded.llm, elapsed)
        return Generation(text=text or "", finish_reason=_finish(choice.get("finish_reason")),
                          prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)), load_ns=load_ns, **timings)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        if request.scored:
            raise InvalidRequest("'logprobs' and 'echo' are answered whole, not streamed: send them without "
                                 "'stream'", param="stream")
        slot = self._slot(request.model, request.num_ctx)
        entry, load_ns = await self._pool.acquire(slot, request.model)
        loaded = entry.handle
        try:
            async with loaded.lock:
                started = time.perf_counter_ns()
                chunks = await to_thread.run_sync(_call, loaded.llm, {**self._call_kwargs(request), "stream": True})
                first_token_ns: int | None = None
                pieces: list[str] = []
                finish_reason: str | None = None
                try:
                    while True:
                        chunk = await to_thread.run_sync(_next, chunks)
                        if chunk is _END:
                            break
                        choice = chunk["choices"][0]
                        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                        finish_reason = choice.get("finish_reason") or finish_reason
                        if text:
                            if first_token_ns is None:
                                first_token_ns = time.perf_counter_ns() - started
                            pieces.append(text)
                            yield TextDelta(text)
                finally:
                    with anyio.CancelScope(shield=True):  # the context must be left idle before unlocking
                        await to_thread.run_sync(chunks.close)
                elapsed = time.perf_counter_ns() - started
                prompt_eval_ns = first_token_ns if first_token_ns is not None else elapsed
                yield Generation(text="".join(pieces), finish_reason=_finish(finish_reason),
                                 prompt_tokens=loaded.llm.last_prompt_tokens,
                                 completion_tokens=loaded.llm.last_completion_tokens, load_ns=load_ns,
                                 prompt_eval_ns=prompt_eval_ns, eval_ns=elapsed - prompt_eval_ns)
        finally:
            await self._pool.release(slot, entry, request.keep_alive_s)

    # --- embeddings, housekeeping ----------------------------------------------------------------

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        slot = self._slot(model, None, embedding=True)
        entry, load_ns = await self._pool.acquire(slot, model)
        try:
            async with entry.handle.lock:
                vectors, tokens = await to_thread.run_sync(_embed, entry.handle.llm, inputs, truncate)
        finally:
            await self._pool.release(slot, entry, keep_alive_s)
        return Embeddings(vectors=vectors, prompt_tokens=tokens, load_ns=load_ns)

    async def loaded(self) -> list[LoadedModel]:
        return await self._pool.loaded()

    async def unload(self, model: ServedModel) -> None:
        await self._pool.evict_model(model)

    async def close(self) -> None:
        await self._pool.close()


def _finish(reason: str | None) -> Any:
    return "length" if reason == "length" else "stop"


def _split_timing(llm: Any, elapsed_ns: int) -> dict[str, int]:
    """Prompt evaluation vs generation time of the last call, from llama.cpp's own counters when it has them."""
    try:
        import llama_cpp

        perf = llama_cpp.llama_perf_context(llm.ctx)
        prompt_ns, eval_ns = int(perf.t_p_eval_ms * 1e6), int(perf.t_eval_ms * 1e6)
        if 0 < prompt_ns + eval_ns <= elapsed_ns * 2:
            return {"prompt_eval_ns": prompt_ns, "eval_ns": eval_ns}
    except (AttributeError, ImportError, TypeError):
        pass
    return {"prompt_eval_ns": 0, "eval_ns": elapsed_ns}


def _call(llm: Any, kwargs: dict[str, Any]) -> Any:
    """A chat or text completion; the caller's mistakes (too long, refused by the template) become 400s.

    A seeded call starts from an empty context: reusing the cached prompt re-evaluates only its last
    token, whose logits then differ in the last bits, and a sampled answer with the same seed differed."""
    from jinja2 import TemplateError

    if kwargs.get("seed") is not None:
        llm.reset()
    if isinstance(kwargs.get("prompt"), list):
        _checked_tokens(llm, kwargs["prompt"])
    try:
        if "messages" in kwargs:
            return llm.create_chat_completion(**kwargs)
        return llm.create_completion(**kwargs)
    except (ValueError, TypeError, TemplateError) as exc:
        raise _translate(exc, llm, kwargs.get("messages")) from None


def _scored_call(llm: Any, kwargs: dict[str, Any]) -> Generation:
    """A text completion with token log probabilities and/or the prompt echoed in front of the answer;
    ``max_tokens`` 0 scores the prompt without generating (for llama-cpp-python it would mean "no limit").
    A prompt of token ids is scored as given, every id listed; a text prompt as llama.cpp tokenizes it."""
    options = dict(kwargs)
    prompt: str | list[int] = options.pop("prompt")
    top: int | None = options.pop("logprobs", None)
    echo: bool = options.pop("echo", False)
    if isinstance(prompt, list):
        tokens = _checked_tokens(llm, prompt)
        prompt_text = llm.detokenize(tokens).decode("utf-8", errors="ignore")
    else:
        tokens, prompt_text = scoring.prompt_tokens(llm, prompt), prompt
    if len(tokens) > llm.n_ctx():
        raise InvalidRequest(f"This model's context window is {llm.n_ctx()} tokens; the prompt has {len(tokens)}.",
                             param="prompt", code="context_length_exceeded")
    scored = None
    if echo and top is not None:
        scored = scoring.score_prompt(llm, tokens, top, listed_bos=isinstance(prompt, list))
    if options.get("max_tokens") == 0:
        text, finish_reason, completion_tokens = "", "length", 0
        answer = TokenLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    else:
        result = _call(llm, {"prompt": prompt, **options, **({"logprobs": top} if top is not None else {})})
        choice = result["choices"][0]
        text, finish_reason = choice["text"] or "", choice.get("finish_reason")
        completion_tokens = int((result.get("usage") or {}).get("completion_tokens", 0))
        # llama-cpp-python counts the answer's offsets from len(prompt): characters, or ids for a token prompt
        answer = scoring.completion_logprobs(choice, shift=len(prompt_text) - len(prompt))
    logprobs = None if top is None else (scored + answer if scored is not None else answer)
    return Generation(text=prompt_text + text if echo else text, finish_reason=_finish(finish_reason),
                      prompt_tokens=len(tokens), completion_tokens=completion_tokens, logprobs=logprobs)


def _checked_tokens(llm: Any, tokens: list[int]) -> list[int]:
    """Token ids the model has (llama.cpp would fail on any other, or worse)."""
    vocabulary = llm.n_vocab()
    unknown = next((token for token in tokens if not 0 <= token < vocabulary), None)
    if unknown is not None:
        raise InvalidRequest(f"the prompt holds the token id {unknown}; this model's token ids are 0 to "
                             f"{vocabulary - 1}", param="prompt")
    return tokens


def _next(chunks: Any) -> Any:
    try:
        return next(chunks, _END)
    except ValueError as exc:
        if "exceed context window" in str(exc):
            raise _context_exceeded(exc) from None
        raise


def _embed(llm: Any, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int]:
    """Normalized mean-pooled vectors (as Ollama's ``/api/embed`` and OpenAI answer) and the tokens read."""
    import math

    n_ctx = llm.n_ctx()
    vectors: list[list[float]] = []
    total = 0
    for index, text in enumerate(inputs):
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        if len(tokens) > n_ctx:
            if not truncate:
                raise input_too_long(index, len(tokens), n_ctx)
            tokens = tokens[:n_ctx]
        total += len(tokens)
        llm.reset()
        llm.eval(tokens)
        vector = list(llm.embed(llm.detokenize(tokens).decode(errors="replace"), normalize=False, truncate=True))
        if vector and isinstance(vector[0], list):  # per-token states: pool them here
            vector = [sum(column) / len(vector) for column in zip(*vector, strict=True)]
        norm = math.sqrt(sum(value * value for value in vector)) or 1.0
        vectors.append([value / norm for value in vector])
    return vectors, total


def _context_exceeded(exc: Exception) -> InvalidRequest:
    return InvalidRequest(f"This model's context window is too small for these messages: {exc}",
                          param="messages", code="context_length_exceeded")


def _translate(exc: Exception, llm: Any, messages: list[dict[str, Any]] | None) -> Exception:
    """What a failed call means: a prompt longer than the context (llama.cpp's ValueError), a conversation
    the model's chat template refuses (its ``raise_exception`` is a ValueError in llama-cpp-python, a
    jinja2 error otherwise), or — when rendering the template again succeeds — a fault of ours, as is."""
    if isinstance(exc, ValueError) and ("exceed context window" in str(exc) or "too long" in str(exc)):
        return _context_exceeded(exc)
    render = _template_renderer(llm)
    if render is None or messages is None:
        return exc
    try:
        render(messages)
    except Exception as refused:  # noqa: BLE001 - the template refused these messages: why is its own text
        return template_refusal(str(refused) or type(refused).__name__, first_refused_message(render, messages))
    return exc


def _template_renderer(llm: Any) -> Callable[[list[dict[str, Any]]], object] | None:
    """Render messages with the chat template llama-cpp-python uses for ``llm`` (the GGUF's own, when it
    formats with it); None when it formats with a built-in format instead."""
    template = (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template")
    if not isinstance(template, str) or getattr(llm, "chat_handler", None) is not None or \
            getattr(llm, "chat_format", None) != "chat_template.default":
        return None
    return gguf_template_renderer(template)
