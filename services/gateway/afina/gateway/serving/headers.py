"""Response headers every inference answer carries, on both surfaces."""

from __future__ import annotations

from urllib.parse import quote

from afina.gateway.serving.dispatch import Answered

TARGET_HEADER = "x-afina-target"  # which model answered: a route's chosen target or the fallback that took over
# the exchange's id (a chat completion is chatcmpl-<id>): what feedback names, on Ollama's API too, which has no id
EXCHANGE_HEADER = "x-afina-exchange-id"
END_USER_HEADER = "x-afina-user"  # the end user an A/B split keeps on one side (OpenAI's ``user`` also works)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def target_headers(answered: Answered) -> dict[str, str]:
    # a header value is latin-1: a model name outside it is percent-encoded
    return {TARGET_HEADER: quote(answered.target.label, safe="/:._-@+"), EXCHANGE_HEADER: answered.exchange_id}
