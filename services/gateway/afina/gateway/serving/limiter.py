"""A bounded queue in front of every model: never an unbounded pile-up of waiting requests.

Each model (``ServedModel.cache_key``) takes ``concurrency`` calls at once; up to ``max_queue``
more wait their turn, in arrival order. One more is refused at once with 429 and ``Retry-After``
(the client, not the gateway's memory, holds it). The queue is also bounded in time: the model's
recent call duration (a moving average) times the calls ahead says how long a newcomer would wait, and
past ``max_wait_s`` it is refused at once, with that wait as its ``Retry-After``, rather than kept
waiting for a first token it would get too late. One that still waits ``queue_timeout_s`` without its
turn gets 503 with ``Retry-After``. A caller that goes away while waiting leaves the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from afina.core.errors import InferenceUnavailable, Overloaded
from afina.core.metrics import GATEWAY_QUEUE_WAIT, bounded_label


@dataclass
class _Gate:
    semaphore: asyncio.Semaphore
    waiting: int = 0
    in_flight: int = 0
    call_s: float | None = None  # moving average of how long a call holds its slot


CALL_S_WEIGHT = 0.2  # of the newest call in the moving average


class ModelLimiter:
    def __init__(self, *, max_queue: int, queue_timeout_s: float, max_wait_s: float | None = None) -> None:
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.max_wait_s = max_wait_s
        self._gates: dict[str, _Gate] = {}

    def _gate(self, key: str, concurrency: int) -> _Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(asyncio.Semaphore(max(1, concurrency)))
        return gate

    @asynccontextmanager
    async def slot(self, key: str, concurrency: int, *, label: str) -> AsyncIterator[None]:
        """Hold one of the model's slots for the duration of the block."""
        gate = self._gate(key, concurrency)
        if gate.semaphore.locked():
            expected_wait_s = (gate.waiting + 1) * (gate.call_s or 0.0) / max(1, concurrency)
            if gate.waiting >= self.max_queue or (self.max_wait_s is not None and expected_wait_s > self.max_wait_s):
                raise Overloaded(f"The model {label} is at capacity ({gate.in_flight} requests running, "
                                 f"{gate.waiting} waiting); retry shortly.",
                                 retry_after_s=max(1.0, min(expected_wait_s, self.max_wait_s or expected_wait_s)))
        gate.waiting += 1
        started = time.perf_counter()
        try:
            # not wait_for: on 3.11 it acquires in a new task, a loop step late, and callers arriving together
            # on an idle model all passed the full-queue check above
            async with asyncio.timeout(self.queue_timeout_s):
                await gate.semaphore.acquire()
        except TimeoutError:
            raise InferenceUnavailable(f"The model {label} did not become free within "
                                       f"{self.queue_timeout_s:.0f}s; retry later.", code="model_busy") from None
        finally:
            gate.waiting -= 1
        GATEWAY_QUEUE_WAIT.labels(model=bounded_label("model", label)).observe(time.perf_counter() - started)
        gate.in_flight += 1
        held_from = time.perf_counter()
        try:
            yield
        finally:
            gate.in_flight -= 1
            gate.semaphore.release()
            held_s = time.perf_counter() - held_from
            gate.call_s = held_s if gate.call_s is None else (1 - CALL_S_WEIGHT) * gate.call_s + CALL_S_WEIGHT * held_s

    def waiting(self, key: str) -> int:
        gate = self._gates.get(key)
        return gate.waiting if gate is not None else 0
