"""What the gateway does with every answered exchange besides answering: counting its tokens against its key's
limit, its metrics (latency, time to first token, tokens/s, tokens in and out, by model, route and tenant with
bounded cardinality), and one access-log line (sizes and ids, never the prompt or the answer)."""

from __future__ import annotations

import logging

from afina.core.logging import log_event
from afina.core.metrics import (
    GATEWAY_REQUEST_SECONDS,
    GATEWAY_TOKENS,
    GATEWAY_TOKENS_PER_SECOND,
    GATEWAY_TTFT_SECONDS,
    INFERENCE_TOKENS,
    bounded_label,
)
from afina.gateway.serving.exchange import Exchange
from afina.gateway.serving.metric_series import series
from afina.gateway.serving.ratelimit import KeyRateLimiter

log = logging.getLogger("afina.gateway.access")


class TokenMeter:
    """Charges an exchange's tokens to its key's per-minute budget."""

    def __init__(self, limiter: KeyRateLimiter) -> None:
        self.limiter = limiter

    async def __call__(self, exchange: Exchange) -> None:
        await self.limiter.record_tokens(exchange.caller, exchange.prompt_tokens + exchange.completion_tokens)


async def record_metrics(exchange: Exchange) -> None:
    model = bounded_label("model", exchange.target)
    route = bounded_label("route", exchange.plan.route or "-")
    tenant = bounded_label("tenant", exchange.caller.tenant_id)
    series(GATEWAY_REQUEST_SECONDS, model, route, tenant).observe(exchange.seconds)
    if exchange.first_piece_seconds is not None:
        series(GATEWAY_TTFT_SECONDS, model, route, tenant).observe(exchange.first_piece_seconds)
    generating_s = exchange.seconds - (exchange.first_piece_seconds or 0.0)
    if exchange.completion_tokens > 1 and generating_s > 0:
        series(GATEWAY_TOKENS_PER_SECOND, model).observe(
            (exchange.completion_tokens - (1 if exchange.stream else 0)) / generating_s)
    for kind, count in (("prompt", exchange.prompt_tokens), ("completion", exchange.completion_tokens)):
        series(GATEWAY_TOKENS, kind, model, route, tenant).inc(count)
        series(INFERENCE_TOKENS, kind).inc(count)


async def access_log(exchange: Exchange) -> None:
    if not log.isEnabledFor(logging.INFO):
        return  # the fields are not worth gathering for a line no handler takes
    log_event(log, "inference.answered", exchange=exchange.id, tenant=exchange.caller.tenant_id,
              key=exchange.caller.prefix, requested=exchange.plan.requested, route=exchange.plan.route,
              target=exchange.target, prompt_tokens=exchange.prompt_tokens,
              completion_tokens=exchange.completion_tokens, seconds=round(exchange.seconds, 4),
              first_piece_seconds=None if exchange.first_piece_seconds is None else round(
                  exchange.first_piece_seconds, 4), stream=exchange.stream,
              finish_reason=exchange.generation.finish_reason if exchange.generation else None)
