"""A bounded queue in front of every model: never an unbounded pile-up of waiting requests.

Each model (``ServedModel.cache_key``) takes ``concurrency`` calls at once; up to ``max_queue``
more wait their turn, in arrival order. One more is refused at once with 429 and ``Retry-After``
(the client, not the gateway's memory, holds it); one that waited ``queue_timeout_s`` without its
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


class ModelLimiter:
    def __init__(self, *, max_queue: int, queue_timeout_s: float) -> None:
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
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
        if gate.semaphore.locked() and gate.waiting >= self.max_queue:
            raise Overloaded(f"The model {label} is at capacity ({gate.in_flight} requests running, "
                             f"{gate.waiting} waiting); retry shortly.", retry_after_s=1.0)
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
        try:
            yield
        finally:
            gate.in_flight -= 1
            gate.semaphore.release()

    def waiting(self, key: str) -> int:
        gate = self._gates.get(key)
        return gate.waiting if gate is not None else 0
