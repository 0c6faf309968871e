"""Tenant matrix: another tenant's id answers exactly like a missing one, on every route that takes one.

The cases are generated from the app's routes: every path parameter must have an entry in
``PATH_OBJECTS`` (what of tenant A it can name), and every query, header and body parameter must
be classified as naming an object (with the objects it can name) or not. A new route, parameter
or body field that nobody classified fails ``test_every_parameter_is_classified``, so it cannot
escape the matrix.

For each reference, tenant B sends the request once with tenant A's object and once with an id of
the same shape that names nothing; the two answers must have the same status (404 for a path id,
a 4xx for a body or query reference) and the same body once the id itself is masked. Tenant A then
sends B's request with its own object and must get a different answer — proof that the object is
real, so the test cannot pass by asking for nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from afina.core.datasets.options import IngestOptions
from afina.gateway.params import MODEL_NAME_PATH
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.gateway_objects import TRAINING_JSONL, TenantObjects, missing_like, seed_tenant_objects
from tests.support.servers import fresh_postgres_database

pytestmark = pytest.mark.integration

A, B = "tenant-a", "tenant-b"
A_KEY_ENV = "AFINA_MATRIX_KEY_0123abcd4567ef89"  # an encryption key variable only tenant A may name
MASK = "<the id>"

Objects = Callable[[TenantObjects], list[tuple[str, str]]]  # tenant -> [(what, id or name)]
FILES: Objects = lambda t: [("training file", t.training_file), ("result file", t.result_file)]  # noqa: E731

# every path parameter of every route: the objects of a tenant it can name
PATH_OBJECTS: dict[str, Objects] = {
    "file_id": FILES,
    "job_id": lambda t: [("job", t.job)],
    "model": lambda t: [("fine-tuned model", t.model)],
    "export_id": lambda t: [("export", t.export)],
    # a file of a model, named inside the model: every tenant's model has one of this name, so it is not
    # tried as A's object (the model in the same path is)
    "filename": lambda t: [("model file", "Modelfile")],
    "name": lambda t: [("route", t.route)],
    "completion_id": lambda t: [("captured completion", f"chatcmpl-{t.capture}")],
    "evaluation_id": lambda t: [("evaluation", t.evaluation)],
    "batch_id": lambda t: [("batch", t.batch)],
}
NOT_OBJECT_PATH = {"filename"}
# a PUT names the caller's own route, creating it: A's route name is B's to take (routes are per tenant); what
# the route's body names is checked below
CREATED_BY_PATH = {("PUT", "/v1/routes/{name}")}
# query and header parameters that name an object, by (route path, parameter); B sends them on its own objects
QUERY_OBJECTS: dict[tuple[str, str], Objects] = {
    ("/v1/files", "after"): FILES,
    ("/v1/fine_tuning/jobs", "after"): lambda t: [("job", t.job)],
    ("/v1/batches", "after"): lambda t: [("batch", t.batch)],
    ("/v1/fine_tuning/jobs/{job_id}/events", "after"): lambda t: [("event", t.events[1])],
    ("/v1/fine_tuning/jobs/{job_id}/events", "last-event-id"): lambda t: [("event", t.events[1])],
    ("/v1/fine_tuning/jobs/{job_id}/checkpoints", "after"): lambda t: [("checkpoint", t.checkpoints[0])],
    ("/v1/models/{model}/exports/{export_id}/events", "after"): lambda t: [("export event", t.export_event)],
    ("/v1/routes/{name}/captures", "after"): lambda t: [("captured exchange", t.capture)],
}
NOT_OBJECT_QUERY = {"limit", "order", "purpose", "stream", "format", "range",  # query/headers that name nothing
                    "unused", "include_feedback"}
# query values that take another code path, each tried with every path reference of the route
QUERY_VARIANTS: dict[str, list[dict[str, str]]] = {
    "/v1/fine_tuning/jobs/{job_id}/events": [{}, {"stream": "true"}],
    "/v1/files/{file_id}/ingest/preview": [{}, {"format": "html"}],
}
MODELS: Objects = lambda t: [("fine-tuned model", t.model), ("route", t.route)]  # noqa: E731 - what serves
ROUTE = f"/v1/routes/{{name:{MODEL_NAME_PATH}}}"
# the Ollama API's inference routes (not in the OpenAPI document, so only here): each names a model or route
OLLAMA_MODEL_ROUTES = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
# a delete through Ollama's API would race the matrix's own delete of A's model: test_ollama_surface checks that
# B's delete of A's model answers like a missing one and leaves it in place
DELETE_TESTED_ELSEWHERE = {("DELETE", "/api/delete")}
# body fields (JSON fields, form fields, ``ingest_options`` fields) that name an object, by route
BODY_OBJECTS: dict[tuple[str, str], dict[str, Objects]] = {
    ("POST", "/v1/fine_tuning/jobs"): {
        "model": lambda t: [("fine-tuned model", t.model), ("store model", t.store_model)],
        "training_file": FILES, "validation_file": FILES},
    ("POST", "/v1/chat/completions"): {"model": MODELS},
    ("POST", "/v1/completions"): {"model": MODELS},
    ("POST", "/v1/embeddings"): {"model": MODELS},
    # a route's targets name models (a route is no target): another tenant's is refused like a missing one
    ("PUT", ROUTE): {"targets.model": lambda t: [("fine-tuned model", t.model)],
                     "fallbacks.model": lambda t: [("fine-tuned model", t.model)],
                     "capture.training_file": FILES},
    **{("POST", path): {"model": MODELS} for path in OLLAMA_MODEL_ROUTES},
    # an evaluation's file must be the caller's (its model is named by the path)
    ("POST", "/v1/fine_tuning/jobs/{job_id}/evaluations"): {"file": FILES},
    ("POST", "/v1/models/{model}/evaluations"): {"file": FILES},
    # a batch's input file must be the caller's (the models its lines name are checked per line, as the caller)
    ("POST", "/v1/batches"): {"input_file_id": FILES},
    ("POST", "/v1/files"): {"ingest_options.base_model": lambda t: [("store model", t.store_model)],
                            "ingest_options.encryption.key_env": lambda t: [("key variable", A_KEY_ENV)]},
}
NOT_OBJECT_BODY: dict[tuple[str, str], set[str]] = {
    ("POST", "/v1/fine_tuning/jobs"): {"suffix", "seed", "metadata", "hyperparameters", "method", "integrations",
                                       "export"},
    # a re-export's options name no object: hub.token_env is checked against the operator's list for the tenant
    ("POST", "/v1/models/{model}/exports"): {"quantizations", "serve", "imatrix", "lora_gguf", "ollama", "hub"},
    ("POST", "/v1/chat/completions"): {"messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
                                       "stop", "seed", "n", "presence_penalty", "frequency_penalty", "stream",
                                       "stream_options", "user", "tools", "top_k", "min_p", "repeat_penalty",
                                       "response_format"},
    ("POST", "/v1/completions"): {"prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                                  "repeat_penalty", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                                  "stream", "stream_options", "echo", "logprobs", "suffix", "best_of", "user"},
    ("POST", "/v1/embeddings"): {"input", "encoding_format", "dimensions", "user"},
    ("PUT", ROUTE): {"system", "options", "timeout_s"},
    # expires_after: seconds to a file's end (the form's bracketed fields or one JSON field), naming nothing
    ("POST", "/v1/files"): {"file", "purpose", "ingest_options", "expires_after", "expires_after[anchor]",
                            "expires_after[seconds]"},
    ("POST", "/v1/chat/completions/{completion_id}/feedback"): {"rating", "correction"},
    # model keys (base, fine_tuned, gguf:<variant>), metric names and labels: words, not objects
    ("POST", "/v1/fine_tuning/jobs/{job_id}/evaluations"): {"models", "metrics", "labels"},
    ("POST", "/v1/models/{model}/evaluations"): {"models", "metrics", "labels"},
    ("POST", "/v1/batches"): {"endpoint", "completion_window", "metadata", "output_expires_after"},
}
# the body a route whose path names the object needs to reach its lookup (without one it is a 400 for any id)
PATH_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/chat/completions/{completion_id}/feedback"): {"rating": "up"},
}
# ingest_options (a JSON form field) names objects too: each of its fields is classified like a body field
NOT_OBJECT_INGEST_OPTIONS = {"format", "container", "encoding", "columns", "transcript", "paired", "field_map",
                             "system_prompt", "csv_delimiter", "mode", "repairs", "deduplicate", "max_seq_len",
                             "length_policy", "split", "min_examples", "preview_count", "encrypt_at_rest"}
OBJECT_INGEST_OPTIONS = {"base_model", "encryption"}


def api_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    """(method, path, route) of every API route, included routers resolved (FastAPI keeps them nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI that copies included routes onto the app
        contexts: Iterator[Any] = iter(app.routes)
    else:
        contexts = iter_route_contexts(app.routes)
    routes = []
    for context in contexts:
        route = getattr(context, "original_route", context)
        if isinstance(route, APIRoute):
            routes.extend((method, context.path, context) for method in sorted(context.methods))
    return routes


def template(path: str) -> str:
    """``/v1/models/{model:path}`` -> ``/v1/models/{model}``, the key the OpenAPI document uses."""
    import re

    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def path_params(path: str) -> list[str]:
    import re

    return re.findall(r"\{(\w+)(?::\w+)?\}", path)


# ---------------------------------------------------------------------------------------------- classification

def operation_fields(document: dict[str, Any], method: str, path: str) -> tuple[list[str], list[str]]:
    """(query and header parameter names, top-level body field names) of one operation of the document."""
    operation = document["paths"][template(path)][method.lower()]
    params = [param["name"].lower() for param in operation.get("parameters", []) if param["in"] in ("query", "header")]
    body: list[str] = []
    for media in operation.get("requestBody", {}).get("content", {}).values():
        schema = media.get("schema", {})
        if "$ref" in schema:
            schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        body += list(schema.get("properties", {}))
    return params, body


def unclassified(app: FastAPI) -> list[str]:
    document = app.openapi()
    problems = []
    for method, path, _route in api_routes(app):
        problems += [f"{method} {path}: path parameter {name!r} has no entry in PATH_OBJECTS"
                     for name in path_params(path) if name not in PATH_OBJECTS]
        if template(path) not in document["paths"]:
            # not in the API's document (/metrics, Ollama's /api): a body it reads must be classified here
            if getattr(_route, "body_field", None) is not None and (method, path) not in BODY_OBJECTS \
                    and (method, path) not in DELETE_TESTED_ELSEWHERE:
                problems.append(f"{method} {path}: its body is not in BODY_OBJECTS")
            continue
        params, body = operation_fields(document, method, path)
        problems += [f"{method} {path}: query/header parameter {name!r} is in neither QUERY_OBJECTS nor "
                     f"NOT_OBJECT_QUERY" for name in params
                     if (template(path), name) not in QUERY_OBJECTS and name not in NOT_OBJECT_QUERY]
        references = {name.split(".")[0] for name in BODY_OBJECTS.get((method, path), {})}
        known = references | NOT_OBJECT_BODY.get((method, path), set())
        problems += [f"{method} {path}: body field {name!r} is in neither BODY_OBJECTS nor NOT_OBJECT_BODY"
                     for name in body if name not in known]
    problems += [f"ingest_options field {name!r} is in neither OBJECT_ nor NOT_OBJECT_INGEST_OPTIONS"
                 for name in set(IngestOptions.model_fields) - OBJECT_INGEST_OPTIONS - NOT_OBJECT_INGEST_OPTIONS]
    upload_references = {name.split(".")[1] for name in BODY_OBJECTS[("POST", "/v1/files")]}
    problems += [f"ingest_options field {name!r} names an object but BODY_OBJECTS has no case for it"
                 for name in OBJECT_INGEST_OPTIONS - upload_references]
    return problems


def test_every_parameter_is_classified(matrix: Matrix) -> None:
    """A route, parameter or body field added without saying what it names fails here."""
    assert api_routes(matrix.app), "no API route found: the route walk is broken"
    assert unclassified(matrix.app) == []


# ---------------------------------------------------------------------------------------------------- the matrix

@dataclass
class Request:
    method: str
    url: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    form: dict[str, str] | None = None  # multipart fields, sent before the file

    def send(self, client: httpx.Client) -> httpx.Response:
        files = {"file": ("train.jsonl", TRAINING_JSONL)} if self.form is not None else None
        return client.request(self.method, self.url, params=self.params, headers=self.headers, json=self.json,
                              data=self.form, files=files)


@dataclass
class Case:
    """One reference: ``build(value, owner)`` is the request naming ``value``, the rest filled with ``owner``'s
    own objects (B's for the matrix, A's for the proof that the object is real)."""

    label: str
    value: str
    missing: str
    build: Callable[[str, TenantObjects], Request]
    path_reference: bool


@dataclass
class Matrix:
    gateway: Gateway
    app: FastAPI
    a: TenantObjects
    b: TenantObjects

    def client(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.gateway.url, timeout=120,
                            headers={"Authorization": f"Bearer {self.gateway.keys[tenant]}"})


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str) -> Iterator[Matrix]:
    os.environ[A_KEY_ENV] = "not-a-real-key"  # exists on the gateway: B must still learn nothing from naming it
    with fresh_postgres_database(postgres_admin_url, "afina_matrix") as database_url:
        settings = make_settings(tmp_path_factory.mktemp("matrix-home"), database_url=database_url,
                                 encryption_key_envs={A: [A_KEY_ENV]})
        gateway = start_gateway(settings, tenants=(A, B))
        try:
            a = seed_tenant_objects(gateway.runtime, A, with_gguf=True)
            b = seed_tenant_objects(gateway.runtime, B)
            yield Matrix(gateway, gateway.served.server.config.app, a, b)  # type: ignore[attr-defined]
        finally:
            gateway.served.stop()
            gateway.runtime.db.dispose()
            os.environ.pop(A_KEY_ENV, None)


def _fill(path: str, values: dict[str, str]) -> str:
    import re
    from urllib.parse import quote

    def value(match: re.Match[str]) -> str:
        # a parameter with a convertor (``{model:path}``) may hold slashes; a plain one may not
        return quote(values[match.group(1)], safe="/:" if match.group(2) else ":")

    return re.sub(r"\{(\w+)(:\w+)?\}", value, path)


def _own(tenant: TenantObjects, path: str) -> dict[str, str]:
    """The path filled with the tenant's own first object of each kind (for query and body references)."""
    return {name: PATH_OBJECTS[name](tenant)[0][1] for name in path_params(path)}


def _body(method: str, path: str, owner: TenantObjects, field_name: str, value: str) -> Request:
    """The owner's otherwise valid request for the route, with one body reference set to ``value``."""
    if path == "/v1/fine_tuning/jobs":
        body: dict[str, Any] = {"model": SMOLLM2, "training_file": owner.training_file, "suffix": "matrix"}
        return Request(method, path, json={**body, field_name: value})
    if path == "/v1/chat/completions":
        return Request(method, path, json={"model": value, "max_tokens": 1, "temperature": 0,
                                           "messages": [{"role": "user", "content": "Say hi."}]})
    if path == "/v1/completions":
        return Request(method, path, json={"model": value, "prompt": "1, 2,", "max_tokens": 1})
    if path == "/v1/embeddings":
        return Request(method, path, json={"model": value, "input": "hi", "encoding_format": "float"})
    if path == ROUTE and field_name == "capture.training_file":
        return Request(method, "/v1/routes/matrix-route", json={"targets": [{"model": SMOLLM2}],
                                                                "capture": {"training_file": value}})
    if path == ROUTE:
        target = {"targets": [{"model": SMOLLM2}], field_name.split(".")[0]: [{"model": value}]}
        return Request(method, "/v1/routes/matrix-route", json=target)
    if path in OLLAMA_MODEL_ROUTES:
        body = {"model": value, "stream": False, "options": {"num_predict": 1}}
        extra = {"/api/chat": {"messages": [{"role": "user", "content": "Say hi."}]}, "/api/generate": {"prompt": "hi"},
                 "/api/embed": {"input": "hi"}, "/api/embeddings": {"prompt": "hi"}}
        return Request(method, path, json={**body, **extra.get(path, {})})
    if path == "/v1/files":
        options: dict[str, Any] = {"base_model": value}
        if field_name == "ingest_options.encryption.key_env":
            options = {"encryption": {"key_env": value, "whole_file": True}}
        return Request(method, path, form={"purpose": "fine-tune", "ingest_options": json.dumps(options)})
    if path == "/v1/batches":
        return Request(method, path, json={"input_file_id": value, "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"})
    if path.endswith("/evaluations"):  # the owner's own job or model, evaluated on the file named
        return Request(method, _fill(path, _own(owner, path)), json={field_name: value})
    raise AssertionError(f"{method} {path}: BODY_OBJECTS names {field_name!r} but _body cannot build the request")


def cases(m: Matrix) -> list[Case]:
    built: list[Case] = []
    for method, path, _route in api_routes(m.app):
        for variant in QUERY_VARIANTS.get(template(path), [{}]):
            for name in path_params(path):  # each path parameter in turn names A's objects, the others the owner's
                if name in NOT_OBJECT_PATH or (method, template(path)) in CREATED_BY_PATH:
                    continue
                for what, value in PATH_OBJECTS[name](m.a):
                    def build(chosen: str, owner: TenantObjects, method: str = method, path: str = path,
                              name: str = name, variant: dict[str, str] = variant) -> Request:
                        return Request(method, _fill(path, {**_own(owner, path), name: chosen}), params=dict(variant),
                                       json=PATH_BODIES.get((method, template(path))))

                    built.append(Case(f"{method} {path} {variant or ''} {name}=A's {what}", value,
                                      missing_like(value), build, True))
        for (route_path, name), objects in QUERY_OBJECTS.items():
            if route_path != template(path) or method != "GET":
                continue
            for what, value in objects(m.a):
                def build(chosen: str, owner: TenantObjects, path: str = path, name: str = name) -> Request:
                    request = Request("GET", _fill(path, _own(owner, path)))
                    if name == "last-event-id":  # read by the event stream only
                        request.headers["Last-Event-ID"] = chosen
                        request.params["stream"] = "true"
                    else:
                        request.params[name] = chosen
                    return request

                built.append(Case(f"GET {path} {name}=A's {what}", value, missing_like(value), build, False))
        for field_name, objects in BODY_OBJECTS.get((method, path), {}).items():
            for what, value in objects(m.a):
                def build(chosen: str, owner: TenantObjects, method: str = method, path: str = path,
                          field_name: str = field_name) -> Request:
                    return _body(method, path, owner, field_name, chosen)

                built.append(Case(f"{method} {path} {field_name}=A's {what}", value, missing_like(value), build, False))
    return built


def masked(response: httpx.Response, value: str) -> tuple[int, str, Any]:
    """(status, content type, body) with ``value`` masked: what must not differ between two answers."""
    text = response.text.replace(value, MASK)
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    return response.status_code, response.headers.get("content-type", ""), body


def test_another_tenants_id_answers_like_a_missing_one(matrix: Matrix) -> None:
    all_cases = cases(matrix)
    assert len(all_cases) >= 20, f"only {len(all_cases)} cases: the route walk is broken"
    failures: list[str] = []
    answers_to_b = {}
    # a delete last: were B able to delete A's object, the cases after it would not see a vanished object
    all_cases.sort(key=lambda case: case.build(case.value, matrix.b).method == "DELETE")
    with matrix.client(B) as tenant_b:
        for case in all_cases:
            theirs = masked(case.build(case.value, matrix.b).send(tenant_b), case.value)
            missing = masked(case.build(case.missing, matrix.b).send(tenant_b), case.missing)
            answers_to_b[case.label] = theirs
            if theirs != missing:
                failures.append(f"{case.label}: A's object answers {theirs}, a missing one {missing}")
            if case.path_reference and theirs[0] != 404:
                failures.append(f"{case.label}: answered {theirs[0]}, not 404: {theirs[2]}")
            if not 400 <= theirs[0] < 500:
                failures.append(f"{case.label}: another tenant's object was accepted ({theirs[0]}): {theirs[2]}")
    # A's own request answers otherwise (the object is real); what changes state (a delete) goes last
    with matrix.client(A) as tenant_a:
        for case in all_cases:
            own = masked(case.build(case.value, matrix.a).send(tenant_a), case.value)
            if own == answers_to_b[case.label]:
                failures.append(f"{case.label}: tenant A gets B's answer {own}: the case names no real object")
    assert failures == [], "\n".join(failures)
