"""Per-key rate limits: requests and tokens per minute, as OpenAI's API keeps them and says so in headers.

Counts live in one-minute windows; what a key used "in the last minute" is the current window plus
the previous one weighted by how much of it still lies within the last 60 s (the sliding-window
estimate Redis-backed limiters use: no per-request log, two counters a key). A request is counted
when it is admitted; its tokens (prompt and completion) when its answer is complete, so a key over
its token budget is refused from its next request on. The counters are in Redis when the gateway
runs as several processes (every process sees one budget), in process otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from afina.core.errors import Overloaded
from afina.core.keys import KeyGrant
from afina.core.settings import Settings

WINDOW_S = 60
KEY_PREFIX = "afina:ratelimit:"
RATE_STATE = "rate_limit"  # the key's RateState, put on request.state when it is admitted (``deps``)


class Windows(Protocol):
    """Counters per (name, window index); ``add`` returns the current and previous windows' values after it."""

    async def add(self, name: str, window: int, amount: int) -> tuple[int, int]: ...

    async def close(self) -> None: ...


class InProcessWindows:
    """The embedded default: one process, one dict (old windows are dropped as time moves on)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._window = -1

    async def add(self, name: str, window: int, amount: int) -> tuple[int, int]:
        if window != self._window:
            self._counts = {key: value for key, value in self._counts.items() if key[1] >= window - 1}
            self._window = window
        current = self._counts.get((name, window), 0) + amount
        self._counts[(name, window)] = current
        return current, self._counts.get((name, window - 1), 0)

    async def close(self) -> None:
        self._counts.clear()


class RedisWindows:
    """Counters in Redis, shared by every gateway process: INCRBY and EXPIRE in one round trip."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    async def add(self, name: str, window: int, amount: int) -> tuple[int, int]:
        current_key, previous_key = f"{KEY_PREFIX}{name}:{window}", f"{KEY_PREFIX}{name}:{window - 1}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(current_key, amount)
            pipe.expire(current_key, 2 * WINDOW_S)
            pipe.get(previous_key)
            current, _, previous = await pipe.execute()
        return int(current), int(previous or 0)

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass(frozen=True)
class Budget:
    limit: int
    used: float
    reset_s: float  # until the count is back under the limit at the latest (the window's end)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - math.ceil(self.used))


@dataclass(frozen=True)
class RateState:
    """What a request may still do this minute, as OpenAI's ``x-ratelimit-*`` headers say it."""

    requests: Budget | None = None
    tokens: Budget | None = None

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, budget in (("requests", self.requests), ("tokens", self.tokens)):
            if budget is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(budget.limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(budget.remaining)
                headers[f"x-ratelimit-reset-{kind}"] = f"{budget.reset_s:.0f}s"
        return headers


class KeyRateLimiter:
    def __init__(self, windows: Windows, *, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.windows = windows
        self.default_requests = requests_per_minute
        self.default_tokens = tokens_per_minute
        self.clock = clock

    def _limits(self, key: KeyGrant) -> tuple[int | None, int | None]:
        return key.requests_per_minute or self.default_requests, key.tokens_per_minute or self.default_tokens

    def _budget(self, limit: int, counts: tuple[int, int], moment: float) -> Budget:
        into_window = moment % WINDOW_S
        used = counts[0] + counts[1] * (1 - into_window / WINDOW_S)
        return Budget(limit=limit, used=used, reset_s=WINDOW_S - into_window)

    async def admit(self, key: KeyGrant) -> RateState:
        """Count one request of ``key``; ``Overloaded`` (429 with ``Retry-After`` and the headers) when the key
        is past either limit. A refused request is not counted."""
        requests_limit, tokens_limit = self._limits(key)
        if requests_limit is None and tokens_limit is None:
            return RateState()
        moment = self.clock()
        window = int(moment // WINDOW_S)
        tokens = None
        if tokens_limit is not None:
            tokens = self._budget(tokens_limit, await self.windows.add(f"{key.prefix}:tokens", window, 0), moment)
        requests = None
        if requests_limit is not None:
            counts = await self.windows.add(f"{key.prefix}:requests", window, 1)
            requests = self._budget(requests_limit, counts, moment)
            if requests.used > requests_limit:
                await self.windows.add(f"{key.prefix}:requests", window, -1)
                requests = Budget(requests_limit, requests.used - 1, requests.reset_s)
                raise self._refusal("requests", requests, RateState(requests, tokens))
        if tokens is not None and tokens.used >= tokens.limit:
            if requests is not None:
                await self.windows.add(f"{key.prefix}:requests", window, -1)
            raise self._refusal("tokens", tokens, RateState(requests, tokens))
        return RateState(requests, tokens)

    @staticmethod
    def _refusal(kind: str, budget: Budget, state: RateState) -> Overloaded:
        return Overloaded(f"Rate limit reached for this API key: {budget.limit} {kind} per minute. Retry in "
                          f"{budget.reset_s:.0f}s, or ask for a higher limit.", retry_after_s=budget.reset_s,
                          headers=state.headers())

    async def record_tokens(self, key: KeyGrant, tokens: int) -> None:
        if tokens > 0 and self._limits(key)[1] is not None:
            await self.windows.add(f"{key.prefix}:tokens", int(self.clock() // WINDOW_S), tokens)

    async def close(self) -> None:
        await self.windows.close()


def open_rate_limiter(settings: Settings) -> KeyRateLimiter:
    """Counters in Redis when the settings name one (several gateway processes share them), in process otherwise."""
    url = settings.resolved_rate_limit_redis_url
    windows: Windows = RedisWindows(url) if url else InProcessWindows()
    return KeyRateLimiter(windows, requests_per_minute=settings.key_requests_per_minute,
                          tokens_per_minute=settings.key_tokens_per_minute)
