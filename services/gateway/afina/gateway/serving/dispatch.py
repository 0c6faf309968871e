"""Running a plan: each candidate in turn, through its model's bounded queue, until one answers.

A candidate gives way to the next when it is down, too slow to start answering (the route's
``timeout_s``), overloaded (429) or failing (5xx) — never for the caller's own mistake (a 400
stays a 400). A stream can fall back only before its first piece: once text reached the caller,
a failure ends the stream. Which candidate answered travels back with the answer, so the
response can name it (``x-afina-target``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from afina.core.errors import AfinaError, InferenceUnavailable, NotFound, Overloaded, UpstreamFailed, UpstreamTimeout
from afina.core.keys import KeyGrant
from afina.core.logging import log_event
from afina.core.metrics import GATEWAY_FALLBACKS, GATEWAY_UPSTREAM_ERRORS, bounded_label
from afina.core.routing import RouteTarget
from afina.gateway.inference.base import (
    LOCAL_BACKEND,
    OLLAMA_BACKEND,
    Embeddings,
    Generation,
    GenerationRequest,
    ServedModel,
    TextDelta,
    UpstreamError,
)
from afina.gateway.serving.backends import Backends
from afina.gateway.serving.exchange import Exchange, Observer, new_exchange_id, tell
from afina.gateway.serving.limiter import ModelLimiter
from afina.gateway.serving.resolve import Plan, Resolver

log = logging.getLogger("afina.gateway.serving")
T = TypeVar("T")
# what makes a candidate give way to the next (a route target's model deleted since the route was written too)
GIVES_WAY = (UpstreamError, InferenceUnavailable, Overloaded, TimeoutError, NotFound)

Builder = Callable[[ServedModel], GenerationRequest]


@dataclass
class Answered:
    """Which candidate answered (``target``), as what model (``served``), and the exchange's id (a chat
    completion's id, the key feedback and captured data refer to)."""

    target: RouteTarget
    served: ServedModel
    exchange_id: str


@dataclass
class StreamAnswer:
    answered: Answered
    pieces: AsyncIterator[TextDelta | Generation]  # the first piece already drawn is its first item


class Dispatcher:
    """Plans and runs calls; ``observers`` learn of every answered one (``serving.exchange``)."""

    def __init__(self, resolver: Resolver, backends: Backends, limiter: ModelLimiter,
                 observers: list[Observer] | None = None, *, cooldown_s: float = 0.0) -> None:
        self.resolver = resolver
        self.backends = backends
        self.limiter = limiter
        self.observers: list[Observer] = list(observers or [])
        # an upstream, or a fine-tune's model in Ollama, that failed is skipped this long while a fallback remains
        # (a circuit breaker keyed by ``breaker_key``: the first request after it tries it again)
        self.cooldown_s = cooldown_s
        self._down_until: dict[str, float] = {}

    async def plan(self, tenant_id: str, name: str, user: str | None = None) -> Plan:
        return await self.resolver.plan(tenant_id, name, user)

    async def generate(self, caller: KeyGrant, plan: Plan, build: Builder) -> tuple[Generation, Answered]:
        started = time.perf_counter()

        async def attempt(served: ServedModel, _target: RouteTarget) -> tuple[Generation, GenerationRequest]:
            request = build(served)
            async with self._slot(served):
                return await self.backends.get(served.backend).generate(request), request

        (generation, request), answered = await self._first_that_answers(caller.tenant_id, plan, attempt)
        await tell(self.observers, Exchange(
            id=answered.exchange_id, caller=caller, plan=plan, target=answered.target.label,
            model=answered.served.name, prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens, seconds=time.perf_counter() - started,
            request=request, generation=generation))
        return generation, answered

    async def embed(self, caller: KeyGrant, plan: Plan, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> tuple[Embeddings, Answered]:
        started = time.perf_counter()

        async def attempt(served: ServedModel, _target: RouteTarget) -> Embeddings:
            async with self._slot(served):
                return await self.backends.get(served.backend).embed(served, inputs, truncate=truncate,
                                                                     keep_alive_s=keep_alive_s)

        embeddings, answered = await self._first_that_answers(caller.tenant_id, plan, attempt)
        await tell(self.observers, Exchange(
            id=answered.exchange_id, caller=caller, plan=plan, target=answered.target.label,
            model=answered.served.name, prompt_tokens=embeddings.prompt_tokens, completion_tokens=0,
            seconds=time.perf_counter() - started))
        return embeddings, answered

    async def stream(self, caller: KeyGrant, plan: Plan, build: Builder) -> StreamAnswer:
        started = time.perf_counter()
        exchange_id = new_exchange_id()

        async def attempt(served: ServedModel, target: RouteTarget) -> AsyncIterator[TextDelta | Generation]:
            request = build(served)

            async def finished(generation: Generation, first_piece_s: float | None) -> None:
                await tell(self.observers, Exchange(
                    id=exchange_id, caller=caller, plan=plan, target=target.label, model=served.name,
                    prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                    seconds=time.perf_counter() - started, first_piece_seconds=first_piece_s, request=request,
                    generation=generation, stream=True))

            pieces = self._guarded_stream(served, request, started, finished)
            try:
                first = await anext(pieces)
            except BaseException:
                await pieces.aclose()
                raise
            return _prepend(first, pieces)

        pieces, answered = await self._first_that_answers(caller.tenant_id, plan, attempt, exchange_id)
        return StreamAnswer(answered=answered, pieces=pieces)

    async def _guarded_stream(self, served: ServedModel, request: GenerationRequest, started: float,
                              finished: Callable[[Generation, float | None], Awaitable[None]],
                              ) -> AsyncIterator[TextDelta | Generation]:
        first_piece_s: float | None = None
        async with self._slot(served):
            pieces = self.backends.get(served.backend).stream(request)
            try:
                async for piece in pieces:
                    if first_piece_s is None:
                        first_piece_s = time.perf_counter() - started
                    if isinstance(piece, Generation):
                        await finished(piece, first_piece_s)
                    yield piece
            finally:
                await pieces.aclose()  # a caller gone mid-stream stops the generation at its source

    def _slot(self, served: ServedModel):  # noqa: ANN202 - an async context manager
        return self.limiter.slot(served.cache_key, self.backends.concurrency(served.backend), label=served.name)

    async def _first_that_answers(self, tenant_id: str, plan: Plan,
                                  attempt: Callable[[ServedModel, RouteTarget], Awaitable[T]],
                                  exchange_id: str | None = None) -> tuple[T, Answered]:
        failure: BaseException | None = None
        for index, target in enumerate(plan.candidates):
            last = index == len(plan.candidates) - 1
            breaker: str | None = None
            try:
                served = await self.resolver.served(tenant_id, target)
                breaker = breaker_key(served)
                if not last and self._cooling_down(breaker):
                    # it just failed: its fallback answers now rather than after the same timeout
                    GATEWAY_FALLBACKS.labels(route=bounded_label("route", plan.route or "-"),
                                             failed_target=bounded_label("model", target.label)).inc()
                    continue
                coroutine = attempt(served, target)
                result = await (asyncio.wait_for(coroutine, plan.timeout_s) if plan.timeout_s else coroutine)
                if breaker is not None:
                    self._down_until.pop(breaker, None)  # it answers again
                return result, Answered(target=target, served=served, exchange_id=exchange_id or new_exchange_id())
            except GIVES_WAY as exc:
                if isinstance(exc, NotFound) and plan.route is None:
                    raise  # a model the caller named directly: their 404
                failure = exc
                self._note_failure(plan, target, exc, last)
                if isinstance(exc, UpstreamError | TimeoutError) and breaker is not None:
                    self._down_until[breaker] = time.monotonic() + self.cooldown_s
        raise _final_error(plan, failure)

    def _cooling_down(self, breaker: str | None) -> bool:
        """Whether what ``breaker`` names failed (down, timed out, 5xx, 429) less than ``cooldown_s`` ago. A
        route's only or last target is always tried: a request never fails on a guess."""
        return breaker is not None and self._down_until.get(breaker, 0.0) > time.monotonic()

    def _note_failure(self, plan: Plan, target: RouteTarget, exc: BaseException, last: bool) -> None:
        status = str(getattr(exc, "status", None) or getattr(exc, "http_status", None) or
                     (504 if isinstance(exc, TimeoutError) else 502))
        GATEWAY_UPSTREAM_ERRORS.labels(backend=target.upstream or "local", status=status).inc()
        log_event(log, "inference.target_failed", logging.WARNING, route=plan.route, target=target.label,
                  error=type(exc).__name__, status=status, detail=str(exc)[:300], fallback=not last)
        if not last and plan.route is not None:
            GATEWAY_FALLBACKS.labels(route=bounded_label("route", plan.route),
                                     failed_target=bounded_label("model", target.label)).inc()


def breaker_key(served: ServedModel) -> str | None:
    """What a failure of ``served`` puts in cooldown: an upstream as a whole (one server, named by its
    configuration); one model of the Ollama that serves exported fine-tunes (a model that fails to load there
    leaves the others answering); nothing for a model run here (slow here means busy: the bounded queue's
    business, and there is no other server to turn to)."""
    if served.backend == LOCAL_BACKEND:
        return None
    if served.backend == OLLAMA_BACKEND:
        return f"{OLLAMA_BACKEND}:{served.upstream_model or served.name}"
    return served.backend


def _final_error(plan: Plan, failure: BaseException | None) -> BaseException:
    """What the caller hears when no candidate answered: a user-facing error that names no upstream detail."""
    if isinstance(failure, AfinaError) and not isinstance(failure, NotFound):
        return failure
    tried = len(plan.candidates)
    suffix = f" (tried {tried} targets of route {plan.route})" if plan.route and tried > 1 else ""
    if isinstance(failure, TimeoutError) or (isinstance(failure, UpstreamError) and failure.status == 504):
        return UpstreamTimeout(f"The model {plan.requested} did not answer in time{suffix}.")
    if isinstance(failure, UpstreamError) and failure.status == 429:
        return Overloaded(f"The model {plan.requested} is rate limited upstream{suffix}; retry shortly.",
                          retry_after_s=failure.retry_after or 1.0)
    return UpstreamFailed(f"The model {plan.requested} could not answer{suffix}; retry later.")


class _Prepended(AsyncIterator[T]):
    """``first`` then the rest of ``rest``. Not an async generator: closing one that never started runs no
    ``finally``, and a stream whose caller left before reading would keep its model's slot."""

    def __init__(self, first: T, rest: AsyncIterator[T]) -> None:
        self._first: list[T] = [first]
        self._rest = rest

    def __aiter__(self) -> _Prepended[T]:
        return self

    async def __anext__(self) -> T:
        if self._first:
            return self._first.pop()
        return await anext(self._rest)

    async def aclose(self) -> None:
        self._first.clear()
        await self._rest.aclose()  # type: ignore[attr-defined]


def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    return _Prepended(first, rest)
