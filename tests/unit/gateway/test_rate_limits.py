"""Per-key limits with the in-process counters and a clock the test moves: the sliding-window estimate, what
is counted, what the headers say."""

from __future__ import annotations

import asyncio

import pytest

from afina.core.errors import Overloaded
from afina.core.keys import KeyGrant
from afina.gateway.serving.exchange import Exchange
from afina.gateway.serving.observers import TokenMeter
from afina.gateway.serving.ratelimit import InProcessWindows, KeyRateLimiter, RateState
from afina.gateway.serving.resolve import Plan

START = 1_800_000_000.0  # the start of a one-minute window


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, *, requests: int | None = None, tokens: int | None = None) -> KeyRateLimiter:
    return KeyRateLimiter(InProcessWindows(), requests_per_minute=requests, tokens_per_minute=tokens, clock=clock)


def admitted(rate: KeyRateLimiter, key: KeyGrant) -> RateState | Overloaded:
    try:
        return asyncio.run(rate.admit(key))
    except Overloaded as exc:
        return exc


def test_no_limit_counts_nothing_and_says_nothing() -> None:
    rate = limiter(Clock())
    state = admitted(rate, KeyGrant("t", "afk-a"))
    assert isinstance(state, RateState) and state.headers() == {}


def test_a_key_limit_wins_over_the_default_and_a_refusal_is_not_counted() -> None:
    clock = Clock()
    rate = limiter(clock, requests=100)
    key = KeyGrant("t", "afk-a", requests_per_minute=2)
    first, second, third = (admitted(rate, key) for _ in range(3))
    assert isinstance(first, RateState) and first.headers()["x-ratelimit-remaining-requests"] == "1"
    assert isinstance(second, RateState) and second.headers()["x-ratelimit-remaining-requests"] == "0"
    assert isinstance(third, Overloaded) and third.http_status == 429
    assert third.headers["x-ratelimit-limit-requests"] == "2" and third.retry_after_s == pytest.approx(60)
    clock.now += 45  # still the same window: the refused call left no trace, the two admitted ones do
    assert isinstance(admitted(rate, key), Overloaded)
    assert isinstance(admitted(rate, KeyGrant("t", "afk-b")), RateState)  # the default for another key


def test_the_previous_minute_weighs_by_how_much_of_it_is_still_within_the_last_60_seconds() -> None:
    clock = Clock()
    rate = limiter(clock, requests=10)
    key = KeyGrant("t", "afk-a")
    for _ in range(10):
        assert isinstance(admitted(rate, key), RateState)
    clock.now += 60 + 45  # 15 s of the full minute remain in the last 60 s: 10 x 0.25 = 2.5 used
    states = [admitted(rate, key) for _ in range(8)]
    assert [isinstance(state, RateState) for state in states] == [True] * 7 + [False]


def test_tokens_are_charged_after_the_answer_and_refuse_the_next_request() -> None:
    clock = Clock()
    rate = limiter(clock, tokens=100)
    key = KeyGrant("t", "afk-a")
    meter = TokenMeter(rate)
    exchange = Exchange(id="x", caller=key, plan=Plan(requested="m", candidates=[]), target="m", model="m",
                        prompt_tokens=60, completion_tokens=40, seconds=0.1)
    state = admitted(rate, key)
    assert isinstance(state, RateState) and state.headers()["x-ratelimit-remaining-tokens"] == "100"
    asyncio.run(meter(exchange))
    refused = admitted(rate, key)
    assert isinstance(refused, Overloaded) and "tokens per minute" in refused.message
    clock.now += 120
    assert isinstance(admitted(rate, key), RateState)
