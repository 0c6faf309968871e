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
from dataclasses import dataclass

from afina.core.errors import InferenceUnavailable, Overloaded
from afina.core.metrics import GATEWAY_QUEUE_WAIT, bounded_label
from afina.gateway.serving.metric_series import series


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

    def slot(self, key: str, concurrency: int, *, label: str) -> _Slot:
        """One of the model's slots, held for the duration of an ``async with`` block."""
        return _Slot(self, self._gate(key, concurrency), concurrency, label)

    def waiting(self, key: str) -> int:
        gate = self._gates.get(key)
        return gate.waiting if gate is not None else 0


class _Slot:
    """An async context manager, not ``@asynccontextmanager``: this is entered and left by every proxied request,
    and a generator-based one cost several times the work. A free model's slot is taken at once, with no
    timeout to arm (``Semaphore.acquire`` does not suspend while the semaphore is not locked)."""

    __slots__ = ("_limiter", "_gate", "_concurrency", "_label", "_held_from")

    def __init__(self, limiter: ModelLimiter, gate: _Gate, concurrency: int, label: str) -> None:
        self._limiter = limiter
        self._gate = gate
        self._concurrency = concurrency
        self._label = label
        self._held_from = 0.0

    async def __aenter__(self) -> None:
        gate, limiter, label = self._gate, self._limiter, self._label
        if gate.semaphore.locked():
            expected_wait_s = (gate.waiting + 1) * (gate.call_s or 0.0) / max(1, self._concurrency)
            if gate.waiting >= limiter.max_queue or (limiter.max_wait_s is not None
                                                     and expected_wait_s > limiter.max_wait_s):
                raise Overloaded(f"The model {label} is at capacity ({gate.in_flight} requests running, "
                                 f"{gate.waiting} waiting); retry shortly.",
                                 retry_after_s=max(1.0, min(expected_wait_s, limiter.max_wait_s or expected_wait_s)))
            started = time.perf_counter()
            gate.waiting += 1
            try:
                # not wait_for: on 3.11 it acquires in a new task, a loop step late, and callers arriving together
                # on an idle model all passed the full-queue check above
                async with asyncio.timeout(limiter.queue_timeout_s):
                    await gate.semaphore.acquire()
            except TimeoutError:
                raise InferenceUnavailable(f"The model {label} did not become free within "
                                           f"{limiter.queue_timeout_s:.0f}s; retry later.", code="model_busy") from None
            finally:
                gate.waiting -= 1
            waited_s = time.perf_counter() - started
        else:
            await gate.semaphore.acquire()  # free: taken without suspending
            waited_s = 0.0
        series(GATEWAY_QUEUE_WAIT, bounded_label("model", label)).observe(waited_s)
        gate.in_flight += 1
        self._held_from = time.perf_counter()

    async def __aexit__(self, *exc_info: object) -> None:
        gate = self._gate
        gate.in_flight -= 1
        gate.semaphore.release()
        held_s = time.perf_counter() - self._held_from
        gate.call_s = held_s if gate.call_s is None else (1 - CALL_S_WEIGHT) * gate.call_s + CALL_S_WEIGHT * held_s
