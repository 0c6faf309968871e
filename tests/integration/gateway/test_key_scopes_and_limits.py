"""API key scopes (inference, fine-tune, admin) and per-key limits (requests and tokens per minute), at the
gateway's door, with the official ``openai`` and ``ollama`` clients; the counters in process and in Redis."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import anyio
import httpx
import ollama
import openai
import pytest

from afina.core.db import repository as repo
from afina.core.keys import KeyGrant
from afina.gateway.serving.ratelimit import KeyRateLimiter, RedisWindows
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hi."}]
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(make_settings(tmp_path_factory.mktemp("limits-home"), inference_n_ctx=256))
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


def new_key(gateway: Gateway, **grant: object) -> str:
    with gateway.runtime.db.session() as session:
        return repo.create_api_key(session, "acme", **grant)


def openai_client(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_each_scope_opens_its_routes_only(limited: Gateway) -> None:
    inference = new_key(limited, scopes=["inference"])
    fine_tune = new_key(limited, scopes=["fine-tune"])
    admin = new_key(limited, scopes=["admin"])

    chat = openai_client(limited, inference).chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=1)
    assert chat.choices[0].message.content is not None
    assert ollama.Client(host=limited.url, headers={"Authorization": f"Bearer {inference}"}).list().models
    with pytest.raises(openai.PermissionDeniedError) as caught:  # training data is the fine-tune scope's
        openai_client(limited, inference).files.create(file=("t.jsonl", b"{}\n"), purpose="fine-tune")
    assert caught.value.body["code"] == "permission_denied" and "fine-tune" in caught.value.message
    assert openai_client(limited, inference).files.list().data == []  # batch files only, and it has none
    with pytest.raises(openai.PermissionDeniedError):
        openai_client(limited, fine_tune).chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=1)
    assert openai_client(limited, fine_tune).files.list().data == []
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=limited.url, headers={"Authorization": f"Bearer {fine_tune}"}).chat(
            model=SMOLLM2, messages=MESSAGES)
    assert refused.value.status_code == 403
    route = {"targets": [{"model": SMOLLM2}]}
    for key, status in ((inference, 403), (fine_tune, 403), (admin, 200)):
        response = httpx.put(f"{limited.url}/v1/routes/scoped", json=route,
                             headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == status, response.text
    # every key may read the models and routes it can call
    for key in (inference, fine_tune, admin):
        assert SMOLLM2 in {model.id for model in openai_client(limited, key).models.list()}


def test_a_key_past_its_requests_per_minute_gets_429_with_headers(limited: Gateway) -> None:
    key = new_key(limited, requests_per_minute=3)
    client = openai_client(limited, key)
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model=SMOLLM2, messages=MESSAGES, max_tokens=1)
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=1)
    response = caught.value.response
    assert caught.value.body["code"] == "rate_limit_exceeded" and int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(ollama.ResponseError) as refused:  # one budget for both surfaces
        ollama.Client(host=limited.url, headers={"Authorization": f"Bearer {key}"}).generate(
            model=SMOLLM2, prompt="hi", options={"num_predict": 1})
    assert refused.value.status_code == 429
    # another key of the same tenant is not held back, and reading what is there is not counted
    other = openai_client(limited, new_key(limited, requests_per_minute=3))
    assert other.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=1).choices
    assert client.models.list().data


def test_a_key_past_its_tokens_per_minute_is_refused_from_its_next_request(limited: Gateway) -> None:
    client = openai_client(limited, new_key(limited, tokens_per_minute=20))
    first = client.chat.completions.with_raw_response.create(model=SMOLLM2, messages=MESSAGES, max_tokens=30)
    assert first.headers["x-ratelimit-limit-tokens"] == "20"
    used = first.parse().usage.total_tokens
    assert used >= 20, "the test needs a first answer that spends the whole budget"
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=1)
    assert "tokens per minute" in caught.value.message


def test_redis_counters_are_shared_between_limiters_and_roll_over() -> None:
    """Two gateway processes are two limiters on one Redis: one budget. A minute later the old window
    weighs less, then nothing."""
    key = KeyGrant(tenant_id="acme", prefix=f"afk-{secrets.token_hex(4)}", requests_per_minute=4)
    moment = [1_800_000_000.0]  # the start of a window

    async def scenario() -> list[str]:
        limiters = [KeyRateLimiter(RedisWindows(REDIS_URL), requests_per_minute=None, tokens_per_minute=None,
                                   clock=lambda: moment[0]) for _ in range(2)]
        outcomes = []
        try:
            for index in range(5):
                try:
                    await limiters[index % 2].admit(key)
                    outcomes.append("ok")
                except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
                    outcomes.append(type(exc).__name__)
            moment[0] += 90  # half of the full window still counts: 4 x 0.5 = 2 used
            outcomes += ["ok" if await _admitted(limiters[0], key) else "refused" for _ in range(3)]
            moment[0] += 120  # both windows are past
            outcomes.append("ok" if await _admitted(limiters[1], key) else "refused")
        finally:
            for limiter in limiters:
                await limiter.close()
        return outcomes

    assert anyio.run(scenario) == ["ok"] * 4 + ["Overloaded", "ok", "ok", "refused", "ok"]


async def _admitted(limiter: KeyRateLimiter, key: KeyGrant) -> bool:
    from afina.core.errors import Overloaded

    try:
        await limiter.admit(key)
    except Overloaded:
        return False
    return True
