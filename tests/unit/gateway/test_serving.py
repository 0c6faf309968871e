"""Serving a public name: the sticky weighted split of a route, its plan, the dispatcher's fallback rules, the
per-model bounded queue, and a route's defaults applied under the request's own values.

The real ``Dispatcher`` and ``ModelLimiter`` run against a scripted backend and two small stand-ins for
``Resolver`` and ``Backends`` (the real ones need a database and settings).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from afina.core.errors import (
    AfinaError,
    InferenceUnavailable,
    InvalidRequest,
    NotFound,
    Overloaded,
    UpstreamFailed,
    UpstreamTimeout,
)
from afina.core.keys import KeyGrant
from afina.core.routing import RouteOptions, RouteSpec, RouteTarget
from afina.gateway.inference.base import (
    LOCAL_BACKEND,
    OLLAMA_BACKEND,
    Embeddings,
    Generation,
    GenerationRequest,
    InferenceBackend,
    LoadedModel,
    Sampling,
    ServedModel,
    TextDelta,
    UpstreamError,
)
from afina.gateway.serving.defaults import with_route_options, with_route_system
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.exchange import Exchange
from afina.gateway.serving.limiter import ModelLimiter
from afina.gateway.serving.resolve import Plan, model_not_found, pick_target, plan_for_route

TENANT = "tenant-1"
CALLER = KeyGrant(tenant_id=TENANT, prefix="afk-test00")
T = TypeVar("T")
SLOW_S = 30.0  # what a hung model takes; every test that meets one gives up long before
ROUTE_TIMEOUT_S = 0.25  # a route's timeout_s in these tests: short, yet ample for a scripted answer


def run(scenario: Awaitable[T]) -> T:
    """One test's event loop, with a bound so a hang fails the test instead of the suite."""
    return asyncio.run(asyncio.wait_for(scenario, timeout=10))


# --- the stand-ins ------------------------------------------------------------------------------------------


@dataclass
class Script:
    """What one served model does when called."""

    pieces: tuple[str, ...] = ("Hel", "lo")
    error: BaseException | None = None  # raised after ``fail_after`` pieces (before the first by default)
    fail_after: int = 0
    delay_s: float = 0.0  # before the first piece (or the whole answer)


@dataclass
class ScriptedBackend:
    """A test double for the ``InferenceBackend`` contract, scripted per served model name (a target's label)."""

    scripts: dict[str, Script] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # served names, in the order they were asked
    requests: list[GenerationRequest] = field(default_factory=list)
    closed_streams: list[str] = field(default_factory=list)  # streams whose iterator was closed (ended or not)

    def _script(self, name: str) -> Script:
        self.calls.append(name)
        return self.scripts.get(name, Script())

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        script = self._script(request.model.name)
        await asyncio.sleep(script.delay_s)
        if script.error is not None:
            raise script.error
        return Generation(text="".join(script.pieces), prompt_tokens=3, completion_tokens=len(script.pieces))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        self.requests.append(request)
        script = self._script(request.model.name)
        try:
            await asyncio.sleep(script.delay_s)
            for index, text in enumerate(script.pieces):
                if script.error is not None and index == script.fail_after:
                    raise script.error
                yield TextDelta(text)
            yield Generation(text="".join(script.pieces), prompt_tokens=3, completion_tokens=len(script.pieces))
        finally:
            self.closed_streams.append(request.model.name)

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        script = self._script(model.name)
        if script.error is not None:
            raise script.error
        return Embeddings(vectors=[[float(len(text))] for text in inputs], prompt_tokens=len(inputs))

    async def loaded(self) -> list[LoadedModel]:
        return []

    async def unload(self, model: ServedModel) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass
class StaticResolver:
    """``Resolver``'s two methods over fixed models and routes; ``served_calls`` shows what was resolved."""

    models: set[str]
    routes: dict[str, RouteSpec] = field(default_factory=dict)
    served_calls: list[str] = field(default_factory=list)
    in_ollama: set[str] = field(default_factory=set)  # fine-tunes the Ollama backend serves

    async def plan(self, tenant_id: str, name: str, user: str | None = None) -> Plan:
        if name in self.routes:
            return plan_for_route(name, self.routes[name], user)
        if name in self.models:
            return Plan(requested=name, candidates=[RouteTarget(model=name)])
        raise model_not_found(name)

    async def served(self, tenant_id: str, target: RouteTarget) -> ServedModel:
        self.served_calls.append(target.label)
        if target.model not in self.models:
            raise model_not_found(target.model)
        if target.model in self.in_ollama:
            return ServedModel(name=target.label, backend=OLLAMA_BACKEND, upstream_model=f"acme-{target.model}")
        if target.upstream is not None:
            return ServedModel(name=target.label, backend=target.upstream, upstream_model=target.model)
        return ServedModel(name=target.label, backend=LOCAL_BACKEND, path=Path(f"/models/{target.model}.gguf"))


@dataclass
class StaticBackends:
    """``Backends``' get/concurrency/all over fixed backends."""

    backends: dict[str, InferenceBackend]
    per_model: int = 4

    def get(self, name: str) -> InferenceBackend:
        if name not in self.backends:
            raise InferenceUnavailable(f"the upstream {name!r} is not configured on this gateway")
        return self.backends[name]

    def concurrency(self, name: str) -> int:
        return self.per_model

    def all(self) -> list[InferenceBackend]:
        return list(self.backends.values())


def dispatcher(backend: ScriptedBackend, models: set[str], *, per_model: int = 4, max_queue: int = 4,
               queue_timeout_s: float = 5.0) -> Dispatcher:
    return Dispatcher(StaticResolver(models), StaticBackends({LOCAL_BACKEND: backend}, per_model=per_model),  # type: ignore[arg-type]
                      ModelLimiter(max_queue=max_queue, queue_timeout_s=queue_timeout_s))


def route_plan(*labels: str, timeout_s: float | None = None) -> Plan:
    """A route answered by its first target, then the others as fallbacks in order."""
    first, *rest = labels
    return plan_for_route("r", RouteSpec(targets=[RouteTarget(model=first)],
                                         fallbacks=[RouteTarget(model=label) for label in rest],
                                         timeout_s=timeout_s), user="u")


def build(model: ServedModel) -> GenerationRequest:
    return GenerationRequest(model=model, messages=[{"role": "user", "content": "hi"}])


def test_the_stand_ins_honour_the_protocol() -> None:
    assert isinstance(ScriptedBackend(), InferenceBackend)


# --- pick_target and plan_for_route --------------------------------------------------------------------------

USERS = [f"user-{index}" for index in range(2000)]


def test_the_same_user_always_gets_the_same_target() -> None:
    targets = [RouteTarget(model="a"), RouteTarget(model="b"), RouteTarget(model="c")]
    first = [pick_target("r", targets, user).label for user in USERS]
    again = [pick_target("r", [target.model_copy() for target in targets], user).label for user in USERS]
    assert first == again
    assert set(first) == {"a", "b", "c"}  # and users do spread over the split


def test_weights_are_respected_over_many_users() -> None:
    """3:1 over 2000 users: the share of ``a`` within 0.05 of 0.75 (the binomial spread is about 0.01)."""
    targets = [RouteTarget(model="a", weight=3), RouteTarget(model="b", weight=1)]
    share = sum(pick_target("r", targets, user).label == "a" for user in USERS) / len(USERS)
    assert abs(share - 0.75) < 0.05


def test_weights_are_respected_without_a_user() -> None:
    targets = [RouteTarget(model="a", weight=1), RouteTarget(model="b", weight=4)]
    share = sum(pick_target("r", targets, None).label == "b" for _ in range(2000)) / 2000
    assert abs(share - 0.8) < 0.05  # random, but 0.05 is more than 5 standard deviations


def test_a_weight_0_target_is_never_chosen() -> None:
    targets = [RouteTarget(model="a"), RouteTarget(model="off", weight=0), RouteTarget(model="b")]
    chosen = {pick_target("r", targets, user).label for user in USERS}
    chosen |= {pick_target("r", targets, None).label for _ in range(500)}
    assert chosen == {"a", "b"}


def test_the_plan_puts_the_chosen_target_first_and_drops_it_from_the_fallbacks() -> None:
    spec = RouteSpec(targets=[RouteTarget(model="a", weight=1), RouteTarget(model="b", weight=1)],
                     fallbacks=[RouteTarget(model="b"), RouteTarget(model="cloud", upstream="openai"),
                                RouteTarget(model="a")],
                     system="be kind", options=RouteOptions(temperature=0.1), timeout_s=3)
    for user in USERS[:50]:
        plan = plan_for_route("r", spec, user)
        chosen = pick_target("r", spec.targets, user).label
        assert [target.label for target in plan.candidates] == [
            chosen, *(label for label in ("b", "openai/cloud", "a") if label != chosen)]
        assert (plan.requested, plan.route, plan.system, plan.timeout_s) == ("r", "r", "be kind", 3)
        assert plan.defaults == RouteOptions(temperature=0.1)
    # a target that is not a fallback is not tried when the chosen one fails
    only = plan_for_route("r", RouteSpec(targets=[RouteTarget(model="a"), RouteTarget(model="b", weight=0)]), "u")
    assert [target.label for target in only.candidates] == ["a"]


# --- the dispatcher's fallback -------------------------------------------------------------------------------

GIVES_WAY = {
    "upstream error": Script(error=UpstreamError("connection refused", status=503)),
    "unavailable": Script(error=InferenceUnavailable("base model is not installed here")),
    "overloaded": Script(error=Overloaded("at capacity")),
    "too slow": Script(delay_s=SLOW_S),
}


@pytest.mark.parametrize("script", GIVES_WAY.values(), ids=GIVES_WAY.keys())
def test_a_failing_target_gives_way_to_the_next(script: Script) -> None:
    backend = ScriptedBackend({"a": script})
    resolver = StaticResolver({"a", "b", "c"})
    dispatch = Dispatcher(resolver, StaticBackends({LOCAL_BACKEND: backend}),  # type: ignore[arg-type]
                          ModelLimiter(max_queue=4, queue_timeout_s=5))
    plan = route_plan("a", "b", "c", timeout_s=ROUTE_TIMEOUT_S)
    generation, answered = run(dispatch.generate(CALLER, plan, build))
    assert generation.text == "Hello" and answered.target.label == "b" and answered.served.name == "b"
    assert backend.calls == ["a", "b"]
    assert resolver.served_calls == ["a", "b"]  # a later fallback costs nothing while one before answers


def test_a_deleted_target_of_a_route_gives_way() -> None:
    backend = ScriptedBackend()
    generation, answered = run(dispatcher(backend, {"b"}).generate(CALLER, route_plan("gone", "b"), build))
    assert answered.target.label == "b" and backend.calls == ["b"]


def test_the_callers_mistake_does_not_fall_back() -> None:
    backend = ScriptedBackend({"a": Script(error=InvalidRequest("bad grammar", param="response_format"))})
    with pytest.raises(InvalidRequest) as caught:
        run(dispatcher(backend, {"a", "b"}).generate(CALLER, route_plan("a", "b"), build))
    assert caught.value.param == "response_format" and backend.calls == ["a"]


def test_a_model_named_directly_that_is_gone_is_the_callers_404() -> None:
    backend = ScriptedBackend()
    plan = Plan(requested="gone", candidates=[RouteTarget(model="gone")])
    with pytest.raises(NotFound) as caught:
        run(dispatcher(backend, set()).generate(CALLER, plan, build))
    assert caught.value.code == "model_not_found" and caught.value.http_status == 404
    assert backend.calls == []


def test_the_first_target_that_answers_is_the_only_one_asked() -> None:
    backend = ScriptedBackend()
    generation, answered = run(dispatcher(backend, {"a", "b"}).generate(CALLER, route_plan("a", "b"), build))
    assert answered.target.label == "a" and backend.calls == ["a"]
    assert backend.requests[0].model == answered.served


@pytest.mark.parametrize("scripts, expected, status", [
    ([Script(error=UpstreamError("upstream said: secret", status=503)),
      Script(error=UpstreamError("upstream said: secret", status=500))], UpstreamFailed, 502),
    ([Script(error=UpstreamError("x", status=503)), Script(delay_s=SLOW_S)], UpstreamTimeout, 504),
    ([Script(error=UpstreamError("x", status=503)), Script(error=UpstreamError("gateway timeout", status=504))],
     UpstreamTimeout, 504),
    ([Script(delay_s=SLOW_S), Script(error=UpstreamError("slow down", status=429, retry_after=7))],
     Overloaded, 429),
    ([Script(error=UpstreamError("x", status=503)), Script(error=InferenceUnavailable("not installed"))],
     InferenceUnavailable, 503),
], ids=["5xx", "timeout", "upstream 504", "upstream 429", "unavailable"])
def test_when_every_target_fails(scripts: list[Script], expected: type[AfinaError], status: int) -> None:
    backend = ScriptedBackend({"a": scripts[0], "b": scripts[1]})
    with pytest.raises(expected) as caught:
        run(dispatcher(backend, {"a", "b"}).generate(CALLER, route_plan("a", "b", timeout_s=ROUTE_TIMEOUT_S),
                                                     build))
    error = caught.value
    assert error.http_status == status and backend.calls == ["a", "b"]
    assert "secret" not in error.message  # an upstream's own words stay in the operator's log
    if expected is UpstreamFailed or expected is UpstreamTimeout:
        assert error.message.startswith("The model r ") and "(tried 2 targets of route r)" in error.message
    if expected is Overloaded:
        assert error.retry_after_s == 7  # type: ignore[attr-defined]


def test_a_429_without_retry_after_asks_for_a_second() -> None:
    backend = ScriptedBackend({"a": Script(error=UpstreamError("slow down", status=429))})
    with pytest.raises(Overloaded) as caught:
        run(dispatcher(backend, {"a"}).generate(CALLER, route_plan("a"), build))
    assert caught.value.retry_after_s == 1.0
    assert "tried" not in caught.value.message  # one target: nothing to count


def test_a_route_whose_targets_are_all_gone_fails_upstream_not_404() -> None:
    with pytest.raises(UpstreamFailed):
        run(dispatcher(ScriptedBackend(), set()).generate(CALLER, route_plan("gone", "also-gone"), build))


def test_embeddings_fall_back_too() -> None:
    backend = ScriptedBackend({"a": Script(error=UpstreamError("down"))})
    embeddings, answered = run(dispatcher(backend, {"a", "b"}).embed(CALLER, route_plan("a", "b"), ["ab", "c"]))
    assert embeddings.vectors == [[2.0], [1.0]] and answered.target.label == "b"


# --- streams -------------------------------------------------------------------------------------------------


async def drain(pieces: AsyncIterator[TextDelta | Generation]) -> list[TextDelta | Generation]:
    return [piece async for piece in pieces]


@pytest.mark.parametrize("script", [Script(error=UpstreamError("down")), Script(delay_s=SLOW_S)],
                         ids=["error", "too slow"])
def test_a_stream_falls_back_before_its_first_piece(script: Script) -> None:
    backend = ScriptedBackend({"a": script, "b": Script(pieces=("B", "!"))})

    async def scenario() -> tuple[Any, list[Any]]:
        plan = route_plan("a", "b", timeout_s=ROUTE_TIMEOUT_S)
        answer = await dispatcher(backend, {"a", "b"}).stream(CALLER, plan, build)
        return answer, await drain(answer.pieces)

    answer, pieces = run(scenario())
    assert answer.answered.target.label == "b"
    assert pieces[:2] == [TextDelta("B"), TextDelta("!")] and isinstance(pieces[2], Generation)
    assert backend.closed_streams == ["a", "b"]  # the abandoned attempt was closed at its source


def test_a_stream_that_fails_after_its_first_piece_does_not_fall_back() -> None:
    backend = ScriptedBackend({"a": Script(pieces=("x", "y", "z"), error=UpstreamError("reset"), fail_after=1)})
    received: list[Any] = []

    async def scenario() -> None:
        answer = await dispatcher(backend, {"a", "b"}).stream(CALLER, route_plan("a", "b"), build)
        async for piece in answer.pieces:
            received.append(piece)

    with pytest.raises(UpstreamError):
        run(scenario())
    assert received == [TextDelta("x")] and backend.calls == ["a"] and backend.closed_streams == ["a"]


def test_a_stream_that_no_target_starts_is_an_error_before_any_piece() -> None:
    backend = ScriptedBackend({"a": Script(error=UpstreamError("down")), "b": Script(error=UpstreamError("down"))})
    with pytest.raises(UpstreamFailed):
        run(dispatcher(backend, {"a", "b"}).stream(CALLER, route_plan("a", "b"), build))
    assert backend.closed_streams == ["a", "b"]


def test_closing_a_stream_early_closes_the_backends_iterator_and_frees_the_slot() -> None:
    backend = ScriptedBackend({"a": Script(pieces=("x",) * 100)})
    dispatch = dispatcher(backend, {"a"}, per_model=1, queue_timeout_s=0.2)

    async def scenario() -> None:
        answer = await dispatch.stream(CALLER, route_plan("a"), build)
        assert await anext(answer.pieces) == TextDelta("x")
        assert await anext(answer.pieces) == TextDelta("x")
        await answer.pieces.aclose()  # the caller went away
        assert backend.closed_streams == ["a"]
        # the model's only slot is free again: the next caller does not wait for the queue timeout
        generation, _ = await dispatch.generate(CALLER, route_plan("a"), build)
        assert generation.completion_tokens == 100

    run(scenario())


def test_closing_a_stream_before_reading_it_closes_the_backends_iterator_and_frees_the_slot() -> None:
    """The first piece was drawn inside ``Dispatcher.stream``; a caller that goes away before reading anything
    (a client gone before the response started) closes ``pieces`` unstarted."""
    backend = ScriptedBackend({"a": Script(pieces=("x",) * 100)})
    dispatch = dispatcher(backend, {"a"}, per_model=1, queue_timeout_s=0.2)

    async def scenario() -> None:
        answer = await dispatch.stream(CALLER, route_plan("a"), build)
        await answer.pieces.aclose()
        assert backend.closed_streams == ["a"]
        generation, _ = await dispatch.generate(CALLER, route_plan("a"), build)
        assert generation.completion_tokens == 100

    run(scenario())


# --- the per-model queue -------------------------------------------------------------------------------------


async def hold(limiter: ModelLimiter, release: asyncio.Event, entered: asyncio.Event | None = None, *,
               concurrency: int = 1) -> None:
    async with limiter.slot("k", concurrency, label="m"):
        if entered is not None:
            entered.set()
        await release.wait()


async def holding(limiter: ModelLimiter, release: asyncio.Event, *, concurrency: int = 1) -> asyncio.Task[None]:
    """A caller that holds one of the model's slots until ``release`` (returned once it holds it)."""
    entered = asyncio.Event()
    task = asyncio.create_task(hold(limiter, release, entered, concurrency=concurrency))
    await entered.wait()
    return task


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def refused(limiter: ModelLimiter, concurrency: int = 1) -> Overloaded:
    started = asyncio.get_running_loop().time()
    with pytest.raises(Overloaded) as caught:
        async with limiter.slot("k", concurrency, label="m"):
            pass
    assert asyncio.get_running_loop().time() - started < 1  # at once, not after the 5 s queue timeout
    return caught.value


def test_a_caller_beyond_the_queue_is_refused_at_once() -> None:
    limiter = ModelLimiter(max_queue=1, queue_timeout_s=5)

    async def scenario() -> None:
        release = asyncio.Event()
        running = await holding(limiter, release)
        waiting = asyncio.create_task(hold(limiter, release))
        await until(lambda: limiter.waiting("k") == 1)
        error = await refused(limiter)
        assert error.retry_after_s == 1.0 and error.http_status == 429
        assert "1 requests running, 1 waiting" in error.message
        async with limiter.slot("other", 1, label="other"):  # another model has its own queue
            pass
        release.set()
        await asyncio.gather(running, waiting)  # the one that waited got its turn
        assert limiter.waiting("k") == 0

    run(scenario())


def test_callers_arriving_together_on_an_idle_model_respect_the_queue_bound() -> None:
    """Concurrency 1, queue 1, five callers at once: one runs, one waits, three are refused."""
    limiter = ModelLimiter(max_queue=1, queue_timeout_s=5)

    async def scenario() -> list[BaseException | None]:
        release = asyncio.Event()
        callers = [asyncio.create_task(hold(limiter, release)) for _ in range(5)]
        await asyncio.sleep(0.02)
        waiting = limiter.waiting("k")
        release.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert waiting <= 1, f"{waiting} callers queued behind a queue of 1"
        return outcomes

    outcomes = run(scenario())
    assert sum(isinstance(outcome, Overloaded) for outcome in outcomes) == 3


def test_a_waiter_past_the_queue_timeout_is_told_the_model_is_busy() -> None:
    limiter = ModelLimiter(max_queue=4, queue_timeout_s=0.05)

    async def scenario() -> None:
        release = asyncio.Event()
        running = await holding(limiter, release)
        with pytest.raises(InferenceUnavailable) as caught:
            async with limiter.slot("k", 1, label="m"):
                pass
        assert caught.value.code == "model_busy" and caught.value.http_status == 503
        assert limiter.waiting("k") == 0
        release.set()
        await running
        async with limiter.slot("k", 1, label="m"):  # the slot was not lost to the one that gave up
            pass

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    limiter = ModelLimiter(max_queue=1, queue_timeout_s=5)

    async def scenario() -> None:
        release = asyncio.Event()
        running = await holding(limiter, release)
        waiter = asyncio.create_task(hold(limiter, release))
        await until(lambda: limiter.waiting("k") == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert limiter.waiting("k") == 0
        second = asyncio.create_task(hold(limiter, release))  # its place in the queue is free again
        await until(lambda: limiter.waiting("k") == 1)
        release.set()
        await asyncio.gather(running, second)
        async with limiter.slot("k", 1, label="m"):  # and no slot was lost
            pass

    run(scenario())


def test_concurrency_lets_that_many_in_at_once() -> None:
    limiter = ModelLimiter(max_queue=0, queue_timeout_s=5)

    async def scenario() -> None:
        release = asyncio.Event()
        holders = [await holding(limiter, release, concurrency=2) for _ in range(2)]
        assert "2 requests running, 0 waiting" in (await refused(limiter, concurrency=2)).message
        release.set()
        await asyncio.gather(*holders)

    run(scenario())


# --- a route's defaults --------------------------------------------------------------------------------------


def test_the_route_system_prompt_goes_first_where_the_conversation_has_none() -> None:
    plan = Plan(requested="r", candidates=[RouteTarget(model="a")], route="r", system="be kind")
    user = [{"role": "user", "content": "hi"}]
    assert with_route_system(plan, user) == [{"role": "system", "content": "be kind"}, *user]
    own = [{"role": "user", "content": "hi"}, {"role": "system", "content": "be terse"}]
    assert with_route_system(plan, own) == own
    assert with_route_system(Plan(requested="m", candidates=[RouteTarget(model="m")]), user) == user


def test_route_options_fill_what_the_request_left_unset() -> None:
    plan = Plan(requested="r", candidates=[RouteTarget(model="a")], route="r",
                defaults=RouteOptions(temperature=0.5, top_p=0.9, max_tokens=50, stop=["\n", "END"], seed=1))
    merged = with_route_options(plan, Sampling(temperature=0.0, seed=9))
    assert merged == Sampling(temperature=0.0, top_p=0.9, max_tokens=50, stop=("\n", "END"), seed=9)
    own_stop = with_route_options(plan, Sampling(stop=("###",)))
    assert own_stop.stop == ("###",) and own_stop.temperature == 0.5


def test_no_route_options_leave_the_sampling_as_it_is() -> None:
    sampling = Sampling(temperature=0.7)
    assert with_route_options(Plan(requested="m", candidates=[RouteTarget(model="m")]), sampling) is sampling


# --- observers ----------------------------------------------------------------------------------------------

def test_observers_learn_of_each_answered_call_once_with_its_tokens_and_target() -> None:
    seen: list[Exchange] = []

    async def observe(exchange: Exchange) -> None:
        seen.append(exchange)

    async def failing(_exchange: Exchange) -> None:
        raise RuntimeError("an observer's own fault")

    backend = ScriptedBackend({"a": Script(error=UpstreamError("down")), "b": Script(pieces=["x", "y"])})
    dispatch = dispatcher(backend, {"a", "b"})
    dispatch.observers = [failing, observe]  # a failing observer neither breaks the answer nor the next one

    async def scenario() -> str:
        generation, answered = await dispatch.generate(CALLER, route_plan("a", "b"), build)
        answer = await dispatch.stream(CALLER, route_plan("a", "b"), build)
        text = "".join([piece.text async for piece in answer.pieces if isinstance(piece, TextDelta)])
        await dispatch.embed(CALLER, route_plan("b"), ["abc"])
        return f"{generation.text}|{text}|{answered.exchange_id == seen[0].id}"

    assert run(scenario()) == "xy|xy|True"
    assert [(e.target, e.stream, e.completion_tokens, e.caller) for e in seen] == [
        ("b", False, 2, CALLER), ("b", True, 2, CALLER), ("b", False, 0, CALLER)]
    assert seen[1].first_piece_seconds is not None and seen[1].request is not None and seen[2].request is None
    assert len({exchange.id for exchange in seen}) == 3 and all(exchange.plan.route == "r" for exchange in seen)


def test_a_stream_closed_before_its_end_is_no_answered_exchange() -> None:
    seen: list[Exchange] = []

    async def observe(exchange: Exchange) -> None:
        seen.append(exchange)

    dispatch = dispatcher(ScriptedBackend({"a": Script(pieces=["x", "y", "z"])}), {"a"})
    dispatch.observers = [observe]

    async def scenario() -> None:
        answer = await dispatch.stream(CALLER, route_plan("a"), build)
        await anext(answer.pieces)
        await answer.pieces.aclose()  # type: ignore[attr-defined]

    run(scenario())
    assert seen == []


def test_a_newcomer_who_would_wait_past_the_time_bound_is_refused_at_once() -> None:
    """The queue is bounded in time too: the model's recent call time x the calls ahead."""
    limiter = ModelLimiter(max_queue=100, queue_timeout_s=5.0, max_wait_s=0.3)

    async def hold(seconds: float) -> None:
        async with limiter.slot("m", 1, label="m"):
            await asyncio.sleep(seconds)

    async def scenario() -> tuple[float, int]:
        await hold(0.2)  # one call teaches the limiter that a call takes about 0.2 s
        first = asyncio.create_task(hold(0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(hold(0.2))  # 1 ahead x 0.2 s: waits
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:  # 2 ahead x 0.2 s > 0.3 s: refused without waiting
            await hold(0.2)
        refused_after = time.perf_counter() - started
        await asyncio.gather(first, second)
        return refused_after, int(refused.value.retry_after_s)

    refused_after, retry_after = run(scenario())
    assert refused_after < 0.05 and retry_after >= 1


def test_an_upstream_that_just_failed_is_skipped_while_a_fallback_remains_then_tried_again() -> None:
    """A circuit breaker: while the cloud is down, the local fallback answers at once, without the cloud's
    timeout each time; after the cool-down the cloud is tried again; a route's last target is always tried."""
    cloud = ScriptedBackend({"cloud/m": Script(error=UpstreamError("connection refused"))})
    local = ScriptedBackend({"local": Script(pieces=["ok"])})
    dispatch = Dispatcher(StaticResolver({"m", "local"}), StaticBackends({LOCAL_BACKEND: local, "cloud": cloud}),  # type: ignore[arg-type]
                          ModelLimiter(max_queue=4, queue_timeout_s=5.0), cooldown_s=0.2)
    route = plan_for_route("aeon", RouteSpec(targets=[RouteTarget(model="m", upstream="cloud")],
                                             fallbacks=[RouteTarget(model="local")]), user=None)
    alone = plan_for_route("cloud-only", RouteSpec(targets=[RouteTarget(model="m", upstream="cloud")]), user=None)

    async def scenario() -> list[str]:
        answers = []
        for pause in (0.0, 0.0, 0.3):
            await asyncio.sleep(pause)
            _, answered = await dispatch.generate(CALLER, route, build)
            answers.append(answered.target.label)
        with pytest.raises(UpstreamFailed):  # no fallback: the cloud is asked, even while cooling down
            await dispatch.generate(CALLER, alone, build)
        return answers

    assert run(scenario()) == ["local", "local", "local"]
    assert cloud.calls == ["cloud/m", "cloud/m", "cloud/m"]  # the first, the one after the cool-down, the lone one


def test_a_fine_tune_in_ollama_that_just_failed_is_skipped_too_and_only_that_model() -> None:
    """The same breaker for a fine-tune the exporter registered in Ollama: while it fails, the route's fallback
    answers at once; another model of the same Ollama is not held against it; after the cool-down it is tried
    again."""
    ollama = ScriptedBackend({"ft": Script(error=UpstreamError("ollama: 500 model failed to load", status=500))})
    local = ScriptedBackend({"local": Script(pieces=["ok"])})
    resolver = StaticResolver({"ft", "other", "local"}, in_ollama={"ft", "other"})
    dispatch = Dispatcher(resolver, StaticBackends({LOCAL_BACKEND: local, OLLAMA_BACKEND: ollama}),  # type: ignore[arg-type]
                          ModelLimiter(max_queue=4, queue_timeout_s=5.0), cooldown_s=0.2)
    route = route_plan("ft", "local")
    other = route_plan("other", "local")

    async def scenario() -> list[str]:
        answers = []
        for pause in (0.0, 0.0, 0.3):
            await asyncio.sleep(pause)
            _, answered = await dispatch.generate(CALLER, route, build)
            answers.append(answered.target.label)
        _, answered = await dispatch.generate(CALLER, other, build)
        answers.append(answered.target.label)
        return answers

    assert run(scenario()) == ["local", "local", "local", "other"]
    assert ollama.calls == ["ft", "ft", "other"]  # the first, the one after the cool-down; "other" not skipped


def test_a_model_run_here_is_never_put_in_cooldown() -> None:
    """A local model that failed is tried again by the next request (busy here is the queue's business)."""
    local = ScriptedBackend({"a": Script(error=UpstreamError("llama.cpp failed", status=500))})
    dispatch = Dispatcher(StaticResolver({"a", "b"}), StaticBackends({LOCAL_BACKEND: local}),  # type: ignore[arg-type]
                          ModelLimiter(max_queue=4, queue_timeout_s=5.0), cooldown_s=10.0)

    async def scenario() -> None:
        for _ in range(2):
            await dispatch.generate(CALLER, route_plan("a", "b"), build)

    run(scenario())
    assert local.calls == ["a", "b", "a", "b"]
