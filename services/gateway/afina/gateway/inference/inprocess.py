"""llama.cpp inside the gateway process: the embedded default.

A llama.cpp context is not thread-safe, so each loaded model has one lock and every
call into it runs in a worker thread while holding that lock; a stream holds it
from the first token to the last. At most ``settings.max_loaded_models`` models stay
loaded (least recently used goes first); an evicted model still serving a stream is
closed when that stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio import to_thread

from afina.core.catalog.template_refusal import first_refused_message, template_refusal
from afina.core.errors import InferenceUnavailable, InvalidRequest
from afina.core.logging import log_event
from afina.core.settings import Settings
from afina.gateway.inference.base import ChatRequest, usage_chunk

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
class _LoadedModel:
    llm: Any
    lock: asyncio.Lock
    users: int = 0
    evicted: bool = False


class InProcessBackend:
    """An LRU of ``llama_cpp.Llama`` objects, called from worker threads one call per model at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: OrderedDict[Path, _LoadedModel] = OrderedDict()
        self._load_locks: dict[Path, asyncio.Lock] = {}
        self._llama_class: type | None = None

    def _load(self, path: Path) -> Any:
        from jinja2 import TemplateError

        if self._llama_class is None:
            self._llama_class = _metered_llama_class()
        try:
            return self._llama_class(model_path=str(path), n_ctx=self.settings.inference_n_ctx,
                                     n_threads=self.settings.inference_threads, verbose=False)
        except (ValueError, RuntimeError, TemplateError) as exc:  # TemplateError: a chat template that won't compile
            raise InferenceUnavailable(f"could not load model file {path.name}: {exc}") from None

    async def _acquire(self, path: Path) -> _LoadedModel:
        """The loaded model for ``path`` (loading it once, even under concurrent first calls)."""
        lock = self._load_locks.setdefault(path, asyncio.Lock())
        async with lock:
            loaded = self._models.get(path)
            if loaded is None:
                log_event(log, "model.loading", path=str(path))
                llm = await to_thread.run_sync(self._load, path)
                loaded = _LoadedModel(llm=llm, lock=asyncio.Lock())
                self._models[path] = loaded
                await self._evict_beyond(self.settings.max_loaded_models)
            self._models.move_to_end(path)
            loaded.users += 1
            return loaded

    async def _release(self, loaded: _LoadedModel) -> None:
        loaded.users -= 1
        if loaded.evicted and loaded.users == 0:
            await to_thread.run_sync(loaded.llm.close)

    async def _evict_beyond(self, keep: int) -> None:
        while len(self._models) > keep:
            path, loaded = self._models.popitem(last=False)
            loaded.evicted = True
            log_event(log, "model.evicted", path=str(path))
            if loaded.users == 0:
                await to_thread.run_sync(loaded.llm.close)

    @staticmethod
    def _kwargs(request: ChatRequest) -> dict[str, Any]:
        return {"messages": request.messages, **request.options}

    async def chat(self, request: ChatRequest) -> dict[str, Any]:
        loaded = await self._acquire(request.model_path)
        try:
            async with loaded.lock:
                return await to_thread.run_sync(_call, loaded.llm, self._kwargs(request))
        finally:
            await self._release(loaded)

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        loaded = await self._acquire(request.model_path)
        try:
            async with loaded.lock:
                chunks = await to_thread.run_sync(_call, loaded.llm, {**self._kwargs(request), "stream": True})
                try:
                    while True:
                        chunk = await to_thread.run_sync(_next, chunks)
                        if chunk is _END:
                            break
                        yield chunk
                finally:
                    with anyio.CancelScope(shield=True):  # the context must be left idle before unlocking
                        await to_thread.run_sync(chunks.close)
                yield usage_chunk(loaded.llm.last_prompt_tokens, loaded.llm.last_completion_tokens)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(loaded)

    async def close(self) -> None:
        await self._evict_beyond(0)


def _call(llm: Any, kwargs: dict[str, Any]) -> Any:
    """``create_chat_completion``; the caller's mistakes (too long, refused by the template) become 400s."""
    from jinja2 import TemplateError

    try:
        return llm.create_chat_completion(**kwargs)
    except (ValueError, TypeError, TemplateError) as exc:
        raise _translate(exc, llm, kwargs["messages"]) from None


def _next(chunks: Any) -> Any:
    try:
        return next(chunks, _END)
    except ValueError as exc:
        if "exceed context window" in str(exc):
            raise _context_exceeded(exc) from None
        raise


def _context_exceeded(exc: Exception) -> InvalidRequest:
    return InvalidRequest(f"This model's context window is too small for these messages: {exc}",
                          param="messages", code="context_length_exceeded")


def _translate(exc: Exception, llm: Any, messages: list[dict[str, Any]]) -> Exception:
    """What a failed call means: a prompt longer than the context (llama.cpp's ValueError), a conversation
    the model's chat template refuses (its ``raise_exception`` is a ValueError in llama-cpp-python, a
    jinja2 error otherwise), or — when rendering the template again succeeds — a fault of ours, as is."""
    if isinstance(exc, ValueError) and "exceed context window" in str(exc):
        return _context_exceeded(exc)
    render = _template_renderer(llm)
    if render is None:
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


def gguf_template_renderer(template: str) -> Callable[[list[dict[str, Any]]], object] | None:
    """A function rendering messages with a GGUF's chat template exactly as llama-cpp-python does (its
    sandbox, its ``raise_exception``); None where llama-cpp-python is not installed or the template does
    not compile. Special tokens render empty: whether a template refuses never depends on them."""
    try:
        from jinja2 import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        return None
    try:
        formatter = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
    except TemplateError:
        return None
    return lambda messages: formatter(messages=messages)
