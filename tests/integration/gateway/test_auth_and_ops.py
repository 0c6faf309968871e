"""Authentication on every API route, and the unauthenticated operational endpoints."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.gateway.conftest import Gateway


@pytest.mark.parametrize("path", ["/v1/models", "/v1/files", "/v1/fine_tuning/jobs", "/v1/files/file-x"])
def test_missing_key_is_401_in_openai_shape(gateway: Gateway, path: str) -> None:
    response = httpx.get(f"{gateway.url}{path}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_invalid_key_is_an_authentication_error(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="afk-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert "afk-not-a-real-key" not in str(caught.value)


def test_post_routes_need_a_key_before_reading_the_body(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.url}/v1/files", files={"file": ("a.jsonl", b'{"a": 1}\n')},
                          data={"purpose": "fine-tune"}, headers={"Authorization": "Basic abc"})
    assert response.status_code == 401
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "x", "messages": []})
    assert response.status_code == 401


def test_health_and_metrics_need_no_key(gateway: Gateway, acme) -> None:  # noqa: ANN001
    acme.models.list()
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{gateway.url}/metrics")
    assert metrics.status_code == 200
    # labelled by route template, never by raw path
    assert 'afina_http_requests_total{method="GET",route="/v1/models",status="200"}' in metrics.text


def test_unknown_route_is_404_in_openai_shape(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.url}/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
