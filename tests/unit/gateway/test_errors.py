"""Errors are mapped once: OpenAI's shape on /v1, Ollama's on /api, nothing leaked on a crash."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from afina.core.errors import Conflict, InferenceUnavailable, InvalidRequest, NotFound
from afina.gateway.errors import install_error_handlers, validation_param


class Body(BaseModel):
    name: str
    count: int


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/missing")
    def missing() -> None:
        raise NotFound("no such file: file-1", param="file_id")

    @app.get("/v1/conflict")
    def conflict() -> None:
        raise Conflict("job is already succeeded")

    @app.get("/v1/down")
    def down() -> None:
        raise InferenceUnavailable("llama.cpp server not ready")

    @app.get("/v1/crash")
    def crash() -> None:
        raise RuntimeError("database password=hunter2 leaked")

    @app.post("/v1/body")
    def body(payload: Body) -> dict:
        return payload.model_dump()

    @app.get("/api/tags")
    def tags() -> None:
        raise InvalidRequest("model is required", param="model")

    return TestClient(app, raise_server_exceptions=False)


def test_afina_error_becomes_openai_error(client: TestClient) -> None:
    response = client.get("/v1/missing")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "no such file: file-1", "type": "invalid_request_error",
                                         "param": "file_id", "code": "not_found"}}
    assert client.get("/v1/conflict").status_code == 409
    down = client.get("/v1/down")
    assert down.status_code == 503 and down.json()["error"]["type"] == "server_error"


def test_unexpected_exception_is_500_without_details(client: TestClient) -> None:
    response = client.get("/v1/crash")
    assert response.status_code == 500
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    assert response.json()["error"]["type"] == "server_error"


def test_validation_error_is_400_naming_the_param(client: TestClient) -> None:
    response = client.post("/v1/body", json={"name": "x", "count": "many"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["type"]) == ("count", "invalid_request_error")
    assert "count" in error["message"]
    missing = client.post("/v1/body", json={"count": 1}).json()["error"]
    assert missing["param"] == "name" and missing["message"] == "Missing required parameter: 'name'."


def test_unparsable_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/body", content=b'{"name": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json" and response.json()["error"]["param"] is None


def test_ollama_paths_get_ollamas_shape(client: TestClient) -> None:
    response = client.get("/api/tags")
    assert response.status_code == 400
    assert response.json() == {"error": "model is required"}
    assert client.get("/api/nothing").json() == {"error": "Not Found"}


def test_http_exceptions_keep_their_status(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.delete("/v1/missing").status_code == 405


@pytest.mark.parametrize("location, param", [
    (("body", "suffix"), "suffix"),
    (("body", "hyperparameters", "n_epochs"), "hyperparameters.n_epochs"),
    (("body", "stop", "list[str]", 0), "stop.0"),
    (("body", "input", "constrained-str"), "input"),
    (("query", "limit"), "limit"),
    (("body",), "body"),
])
def test_validation_param(location: tuple, param: str) -> None:
    assert validation_param(location) == param
