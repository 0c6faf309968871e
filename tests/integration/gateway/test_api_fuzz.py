"""API fuzzing: schemathesis against the gateway's own OpenAPI document, on PostgreSQL (production's registry).

Every operation of ``app.openapi()`` gets schema-valid requests (positive) and, where its
parameters admit any, schema-invalid ones (negative), with a valid API key: once with generated
ids and once with the tenant's real file, job and model in the path, so the documented 200
bodies are checked too. Every answer must be no 5xx, a status the document lists for the
operation (exactly, not only through a ``4XX`` range), of a documented content type, with the
documented headers and a body matching the documented schema; schema-invalid input must be
refused with a 4xx. ``positive_data_acceptance`` is the one check left out, on purpose: whether a
schema-valid request succeeds depends on state the document cannot express (an id that exists,
file bytes that are a dataset), and the gateway answers those with a documented 400/404.

The regression tests at the end pin what the fuzzer found, so it stays fixed whatever it draws.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis  # requirements-dev.txt
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.gateway_objects import TenantObjects, seed_tenant_objects
from tests.support.servers import fresh_postgres_database

pytestmark = pytest.mark.integration

TENANT = "fuzz"
# per operation and mode: ~20 operations x 3 passes stay well under a minute; raise it for a longer hunt
MAX_EXAMPLES = int(os.environ.get("AFINA_FUZZ_MAX_EXAMPLES", "30"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
HYPOTHESIS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                             HealthCheck.data_too_large])
REQUEST_TIMEOUT_S = 60
INFERENCE_N_CTX = 256


@dataclass
class Fuzzed:
    gateway: Gateway
    document: dict[str, Any]
    objects: TenantObjects

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.gateway.keys[TENANT]}"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str) -> Iterator[Fuzzed]:
    with fresh_postgres_database(postgres_admin_url, "afina_fuzz") as database_url:
        # schemathesis draws catalog names from the document, so some chats run the real SmolLM2: a small
        # context bounds each generation (a request without max_tokens runs to the context's end)
        settings = make_settings(tmp_path_factory.mktemp("fuzz-home"), database_url=database_url,
                                 inference_n_ctx=INFERENCE_N_CTX)
        gateway = start_gateway(settings, tenants=(TENANT,))
        try:
            app = gateway.served.server.config.app  # type: ignore[attr-defined]
            yield Fuzzed(gateway, app.openapi(), seed_tenant_objects(gateway.runtime, TENANT))
        finally:
            gateway.served.stop()
            gateway.runtime.db.dispose()


@dataclass
class Run:
    """What a pass sent and what broke, per operation."""

    failures: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    media_types: dict[str, set[str]] = field(default_factory=dict)


def has_invalid_inputs(operation: dict[str, Any]) -> bool:
    """Whether any schema-invalid request exists: a body, or a parameter that is more than any string."""
    if "requestBody" in operation:
        return True
    schemas = [{key: value for key, value in param.get("schema", {}).items() if key not in ("title", "description")}
               for param in operation.get("parameters", [])]
    # an optional header or query string (``str | None``) accepts every value a request can carry, too
    any_string = ({"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]})
    return any(schema not in any_string for schema in schemas)


def _documented_exactly(operation: Any, status: int) -> bool:
    return str(status) in operation.definition.raw.get("responses", {})


def _property(fuzzed: Fuzzed, run: Run, label: str, operation: Any, cases: Any) -> Any:
    """The hypothesis test of one operation: call it, run the checks, and insist on an exactly listed status."""

    @HYPOTHESIS
    @given(case=cases)
    def check(case: Any) -> None:
        run.sent[label] += 1
        run.media_types.setdefault(operation.label, set()).add(str(case.media_type))
        response = case.call_and_validate(base_url=fuzzed.gateway.url, headers=fuzzed.headers, checks=CHECKS,
                                          timeout=REQUEST_TIMEOUT_S)
        assert _documented_exactly(operation, response.status_code), (
            f"status {response.status_code} is documented only through a range: list it with its meaning")

    return check


def fuzz(fuzzed: Fuzzed, *, path_parameters: dict[str, str] | None = None) -> Run:
    """Run every operation (those whose path parameters are all in ``path_parameters``, when given)."""
    schema = schemathesis.openapi.from_dict(fuzzed.document)
    run = Run()
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()  # raises for an operation schemathesis cannot read: the document is broken
        names = {param.name for param in operation.path_parameters}
        if path_parameters is None or (names and names <= set(path_parameters)):
            operations.append(operation)
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")  # a real delete goes last
    assert operations, "no operation to fuzz: the document or the filter is wrong"
    for operation in operations:
        fixed = {name: path_parameters[name] for name in {p.name for p in operation.path_parameters}} \
            if path_parameters else None
        modes = [GenerationMode.POSITIVE]
        if fixed is None and has_invalid_inputs(operation.definition.raw):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            label = f"{operation.label} [{mode.value}{', real ids' if fixed else ''}]"
            run.sent[label] = 0

            try:
                _property(fuzzed, run, label, operation, operation.as_strategy(generation_mode=mode,
                                                                               path_parameters=fixed))()
            except Unsatisfiable as exc:
                run.failures.append(f"{label}: no {mode.value} input could be generated: {exc}")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - schemathesis' FailureGroup is a BaseExceptionGroup
                run.failures.append(f"{label}: {exc}")  # every operation's failure, reported together
    return run


def test_fuzz_every_operation_with_generated_ids(fuzzed: Fuzzed) -> None:
    started = time.monotonic()
    run = fuzz(fuzzed)
    assert run.failures == [], "\n\n".join(run.failures)
    documented = {f"{method.upper()} {path}" for path, item in fuzzed.document["paths"].items() for method in item}
    assert {label.split(" [")[0] for label in run.sent} == documented, "an operation was not fuzzed"
    assert all(count > 0 for count in run.sent.values()), run.sent
    assert "multipart/form-data" in run.media_types["POST /v1/files"], "uploads were not sent as multipart"
    print(f"fuzzed {len(run.sent)} operation passes, {sum(run.sent.values())} requests, "
          f"{time.monotonic() - started:.1f} s")


def test_fuzz_the_tenants_own_objects(fuzzed: Fuzzed) -> None:
    """Real ids in the path: the documented 200 bodies (files, ingest artifacts, jobs, events, checkpoints,
    models, the event stream of a finished job) are checked too; the delete and the cancel run for real."""
    objects = fuzzed.objects
    run = fuzz(fuzzed, path_parameters={"file_id": objects.training_file, "job_id": objects.job,
                                        "model": objects.model})
    assert run.failures == [], "\n\n".join(run.failures)
    assert len(run.sent) >= 12, run.sent


# ------------------------------------------------------------------------------------- what the fuzzer found

def client(fuzzed: Fuzzed) -> httpx.Client:
    # a fresh connection per request: a 500 makes uvicorn drop the connection it came on
    return httpx.Client(base_url=fuzzed.gateway.url, headers={**fuzzed.headers, "Connection": "close"}, timeout=30)


NUL_REQUESTS = [
    ("GET", "/v1/files/file-a%00b", None, "file_id"),
    ("DELETE", "/v1/files/file-a%00b", None, "file_id"),
    ("GET", "/v1/files/file-a%00b/ingest", None, "file_id"),
    ("GET", "/v1/files?purpose=fine-tune%00", None, "purpose"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-a%00", None, "job_id"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-a%00/cancel", None, "job_id"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-a%00/events", None, "job_id"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-a%00/checkpoints", None, "job_id"),
    ("GET", "/v1/fine_tuning/jobs?after=ftjob-a%00", None, "after"),
    ("GET", "/v1/models/ft:a%00", None, "model"),
    ("POST", "/v1/fine_tuning/jobs", {"model": SMOLLM2, "training_file": "file-a\x00"}, "training_file"),
    ("POST", "/v1/fine_tuning/jobs", {"model": "ft:a\x00", "training_file": "file-a"}, "model"),
    ("POST", "/v1/chat/completions", {"model": "ft:a\x00", "messages": [{"role": "user", "content": "hi"}]},
     "model"),
]


@pytest.mark.parametrize(("method", "url", "body", "param"), NUL_REQUESTS,
                         ids=[f"{method} {url} {param}" for method, url, _, param in NUL_REQUESTS])
def test_a_nul_character_is_a_400_naming_the_parameter(fuzzed: Fuzzed, method: str, url: str,
                                                       body: dict[str, Any] | None, param: str) -> None:
    """PostgreSQL text cannot hold U+0000: the registry query raised and the gateway answered 500."""
    with client(fuzzed) as http:
        response = http.request(method, url, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "NUL" in error["message"], error


def test_a_nul_character_in_an_upload_filename_is_dropped(fuzzed: Fuzzed) -> None:
    boundary = "afinafuzzboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"tr\x00ain.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        + f"\r\n--{boundary}--\r\n".encode())
    with client(fuzzed) as http:
        response = http.post("/v1/files", content=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "train.jsonl"


@pytest.mark.parametrize("name", ["a\nb", "\n", "ft:x:y\r\nz", "org/a\nb/files"])
def test_a_model_name_with_a_line_break_is_a_404_not_a_405(fuzzed: Fuzzed, name: str) -> None:
    """Starlette's ``{model:path}`` stopped at a newline that ``DELETE /v1/models/{model}`` took: a GET of such
    a name matched only the DELETE route and answered an undocumented 405."""
    with client(fuzzed) as http:
        response = http.get(f"/v1/models/{quote(name, safe='/')}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_a_catalog_model_without_servable_weights_is_a_404(fuzzed: Fuzzed) -> None:
    """A base model afina can train but has no GGUF of (Mistral 7B here) answered 503, a server error."""
    with client(fuzzed) as http:
        response = http.post("/v1/chat/completions", json={"model": "mistral:7b", "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 1})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_an_embedding_input_past_its_limit_is_a_400_not_a_413(fuzzed: Fuzzed) -> None:
    """An input of any length made the body too large before it was found too long (413, not a refusal)."""
    with client(fuzzed) as http:
        response = http.post("/v1/embeddings", json={"model": SMOLLM2, "input": "x" * 100_001})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input"


def test_an_event_stream_refuses_after(fuzzed: Fuzzed) -> None:
    """``after`` pages the newest-first list; the stream ignored it and sent every event."""
    with client(fuzzed) as http:
        response = http.get(f"/v1/fine_tuning/jobs/{fuzzed.objects.job}/events",
                            params={"stream": "true", "after": fuzzed.objects.events[1]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "after"


def test_the_document_declares_the_error_body_not_fastapis_422(fuzzed: Fuzzed) -> None:
    """afina answers a validation error with a 400 in OpenAI's shape; the document said 422 HTTPValidationError."""
    document = fuzzed.document
    assert "HTTPValidationError" not in document.get("components", {}).get("schemas", {})
    for path, item in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path}"
            for status in ("400", "401", "500", "503") + (("404",) if "{" in path else ()):
                schema = responses.get(status, {}).get("content", {}).get("application/json", {}).get("schema")
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, f"{method} {path} {status}"
