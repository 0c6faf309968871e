"""Capture for retraining: the observer that keeps every answered chat of a route with ``capture`` on.

The dispatcher tells it of each exchange once the answer is complete. Whether to keep it was read
with the route when the request was planned (``Plan.capture``), so an exchange of a route without
capture, of a model named directly, of a raw prompt or an embedding costs nothing here. A kept one
is written in a worker thread (redacted as the route says, in ``captures.service.capture_exchange``)
before the dispatcher returns, so feedback posted right after the answer finds it. When that
makes ``retrain_after`` unused exchanges, the observer starts the retraining job in the same
worker thread: the answer that tipped the count waits for it (an upload and a job row), every
other answer pays only the one write (and a count, with ``retrain_after`` set).

A retraining that fails (its training file cannot be read, too few examples left after
feedback) is logged and not tried again for that route before ``settings.capture_retrain_retry_s``, so a
misconfigured route costs one warning a while, not a failed upload per answer.
"""

from __future__ import annotations

import logging
import time

from anyio import to_thread

from afina.core.errors import AfinaError
from afina.core.logging import log_event
from afina.core.runtime import Runtime
from afina.gateway.captures import retrain, service
from afina.gateway.serving.exchange import Exchange

log = logging.getLogger("afina.gateway.capture")


class CaptureObserver:
    """An exchange observer (``serving.exchange.Observer``) keeping the chats of capturing routes."""

    def __init__(self, runtime: Runtime, *, retry_after_failure_s: float | None = None) -> None:
        self.runtime = runtime
        self.retry_after_failure_s = runtime.settings.capture_retrain_retry_s if retry_after_failure_s is None \
            else retry_after_failure_s
        self.__name__ = "capture"  # how ``serving.exchange.tell`` names an observer in its log
        self._retry_at: dict[tuple[str, str], float] = {}  # (tenant, route) -> monotonic time

    async def __call__(self, exchange: Exchange) -> None:
        request = exchange.request
        if exchange.plan.capture is None or request is None or request.messages is None \
                or exchange.generation is None:
            return
        await to_thread.run_sync(self._capture, exchange)

    def _capture(self, exchange: Exchange) -> None:
        due = service.capture_exchange(self.runtime, exchange)
        if due is None or due.retrain_after is None:
            return
        key = (exchange.caller.tenant_id, exchange.plan.route or "")
        if time.monotonic() < self._retry_at.get(key, 0.0):
            return
        try:
            retrain.start_retraining(self.runtime, key[0], key[1], at_least=due.retrain_after)
        except AfinaError as exc:
            self._retry_at[key] = time.monotonic() + self.retry_after_failure_s
            log_event(log, "capture.retraining_failed", logging.WARNING, tenant=key[0], route=key[1],
                      code=exc.code, error=exc.message, retry_in_s=self.retry_after_failure_s)
        else:
            self._retry_at.pop(key, None)
