"""Canary secrets through a whole job and through failing ones: not one may surface anywhere.

The stack runs in this process: a real gateway (uvicorn on loopback) with a PostgreSQL registry whose URL
carries a password, an S3 store on a SeaweedFS of our own whose keys are AWS-shaped canaries, a Hub token in
``HF_TOKEN`` and a Fernet key in ``AFINA_DATA_ENCRYPTION_KEY`` (the dataset is encrypted at rest with it).
The job's stages run through ``run_stage``, as a worker runs them. Every log line (rendered by both of
afina's formatters), every HTTP body the tenant receives (job, events, checkpoints, files, errors), every
object in the store and every file under the home is searched for each canary: zero occurrences.

The failing jobs raise, inside a stage, an unexpected exception and a typed afina error whose messages hold
every canary: the user gets a generic message with an error id, the log the detail (scrubbed) under that id.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from afina.core.db import repository as repo
from afina.core.errors import InvalidRequest
from afina.core.logging import JsonFormatter, KeyValueFormatter
from afina.core.queue.jobs import JobContext, run_stage
from afina.deploy.processes import stop
from afina.deploy.seaweedfs import SeaweedS3, start_seaweedfs
from tests.integration.gateway.conftest import SMOLLM2, make_settings
from tests.support.jobs import sample_examples
from tests.support.models import materialized_base_model, shared_model_cache
from tests.support.servers import ServedApp, serve_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TENANT = "acme"
S3_ACCESS_KEY = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
S3_SECRET_KEY = base64.b64encode(os.urandom(30)).decode()  # 40 characters of [A-Za-z0-9+/], as AWS's are
HUB_TOKEN = "hf_" + secrets.token_hex(17)
FERNET_KEY = Fernet.generate_key().decode()
DB_PASSWORD = "pg" + secrets.token_hex(12)  # trust auth on the test server: accepted, never checked
SCAN_LIMIT_BYTES = 32 * 1024 * 1024  # larger objects are model weights (GGUF, safetensors)
ERROR_ID = re.compile(r"err[_-][0-9a-f]{16}")
# the 24 shortest sample conversations: six optimizer steps at batch 4
EXAMPLES = sorted(sample_examples(), key=lambda example: len(str(example)))[:24]


class _RenderedLog(logging.Handler):
    """Every record, rendered as an operator would read it, by both formatters."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.formatters = (JsonFormatter(), KeyValueFormatter())
        self.lines: list[str] = []
        self.unscrubbed: list[str] = []  # what reached the logging system, before the formatters scrubbed it

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(formatter.format(record) for formatter in self.formatters)
        self.unscrubbed.append(f"{record.getMessage()} {getattr(record, 'fields', '')}")


@dataclass
class Stack:
    runtime: Any  # afina.core.runtime.Runtime
    served: ServedApp
    api_key: str
    log: _RenderedLog
    seen: list[str] = field(default_factory=list)  # every HTTP body the tenant received

    @property
    def canaries(self) -> dict[str, str]:
        return {"afina API key": self.api_key, "S3 access key": S3_ACCESS_KEY, "S3 secret key": S3_SECRET_KEY,
                "Hub token": HUB_TOKEN, "Fernet key": FERNET_KEY, "database password": DB_PASSWORD}

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        response = httpx.request(method, f"{self.served.url}{path}", headers=headers, timeout=120, **kwargs)
        self.seen.append(response.text if "json" in response.headers.get("content-type", "") or
                         response.headers.get("content-type", "").startswith("text") else
                         response.content.decode("latin-1"))
        return response

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/fine_tuning/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def upload(self, options: dict[str, Any] | None = None) -> str:
        content = b"".join(json.dumps(example).encode() + b"\n" for example in EXAMPLES)
        data = {"purpose": "fine-tune"}
        if options is not None:
            data["ingest_options"] = json.dumps(options)
        response = self.call("POST", "/v1/files", data=data, files={"file": ("aeon.jsonl", content)})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def create_job(self, file_id: str, suffix: str) -> str:
        response = self.call("POST", "/v1/fine_tuning/jobs", json={
            "model": SMOLLM2, "training_file": file_id, "suffix": suffix,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def read_everything_of(self, job_id: str) -> dict[str, Any]:
        """The job as the tenant sees it, with its events, checkpoints and result files (each body kept)."""
        job = self.job(job_id)
        self.call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000})
        self.call("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100})
        for file_id in job.get("result_files") or []:
            self.call("GET", f"/v1/files/{file_id}")
            self.call("GET", f"/v1/files/{file_id}/content")
        return job

    def leaks(self) -> dict[str, list[str]]:
        """Where each canary was found: log lines, HTTP bodies, store objects, files under the home."""
        found: dict[str, list[str]] = {}
        places = [(f"log line {i}", line) for i, line in enumerate(self.log.lines)]
        places += [(f"HTTP body {i}", body) for i, body in enumerate(self.seen)]
        store = self.runtime.store
        for info in store.list(""):
            if info.size <= SCAN_LIMIT_BYTES:
                places.append((f"store object {info.key}", store.get_bytes(info.key).decode("latin-1")))
        for path in self.runtime.settings.home.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= SCAN_LIMIT_BYTES:
                places.append((f"file {path}", path.read_bytes().decode("latin-1")))
        for name, canary in self.canaries.items():
            where = [place for place, text in places if canary in text]
            if where:
                found[name] = where[:5]
        return found


@pytest.fixture(scope="module")
def canary_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """The same SeaweedFS launch as the shared ``seaweedfs`` fixture, with canary credentials."""
    folder = tmp_path_factory.mktemp("canary-seaweedfs")
    server = start_seaweedfs(folder, folder, dict(os.environ), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
    yield server
    stop(server.process.pid)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, canary_s3: SeaweedS3, postgres_admin_url: str) -> Iterator[Stack]:
    from afina.core.runtime import Runtime
    from afina.gateway.app import create_app
    from tests.support.servers import fresh_postgres_database

    materialized_base_model(tmp_path_factory)
    root, handler = logging.getLogger(), _RenderedLog()
    level = root.level
    with pytest.MonkeyPatch.context() as env, fresh_postgres_database(postgres_admin_url) as database_url:
        env.setenv("HF_TOKEN", HUB_TOKEN)
        env.setenv("AFINA_DATA_ENCRYPTION_KEY", FERNET_KEY)
        settings = make_settings(
            tmp_path_factory.mktemp("canary-home"),
            database_url=database_url.replace("postgres@", f"postgres:{DB_PASSWORD}@"),
            store_backend="s3", s3_endpoint=canary_s3.endpoint, s3_access_key=SecretStr(S3_ACCESS_KEY),
            s3_secret_key=SecretStr(S3_SECRET_KEY), s3_bucket=f"canary-{secrets.token_hex(4)}",
            data_encryption_key=SecretStr(FERNET_KEY), model_cache_dir=shared_model_cache(tmp_path_factory),
            log_level="INFO")
        assert DB_PASSWORD in settings.resolved_database_url
        runtime = Runtime(settings)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with runtime.db.session() as session:
                api_key = repo.create_api_key(session, TENANT)
            served = serve_app(create_app(runtime))
            try:
                yield Stack(runtime=runtime, served=served, api_key=api_key, log=handler)
            finally:
                served.stop()
                runtime.db.dispose()
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


def test_a_whole_job_leaves_no_canary_anywhere(stack: Stack) -> None:
    from afina.exporter.pipeline import export_job
    from afina.ingest.prepare import prepare_dataset
    from afina.trainer.recipe import train_job

    file_id = stack.upload({"encrypt_at_rest": True})
    job_id = stack.create_job(file_id, "canary")
    for stage, work in (("ingest", prepare_dataset), ("train", train_job), ("export", export_job)):
        assert run_stage(stack.runtime, job_id, stage, work) == "done", stack.job(job_id).get("error")

    job = stack.read_everything_of(job_id)
    assert job["status"] == "succeeded", job.get("error")
    assert job["result_files"] and job["fine_tuned_model"]
    stack.call("GET", "/v1/models")
    stack.call("GET", f"/v1/files/{file_id}")
    # the tenant's mistakes answer too, and their bodies are searched as well
    assert stack.call("GET", "/v1/files/file-nope").status_code == 404
    assert stack.call("GET", "/v1/models", headers={"Authorization": f"Bearer {stack.api_key}x"}).status_code == 401
    # the capture saw afina's own operator log (else the test would prove nothing)
    assert any('"event":"gateway.started"' in line for line in stack.log.lines), stack.log.lines[:20]

    assert stack.leaks() == {}


def _every_canary(stack: Stack) -> str:
    return (f"connect to postgresql+psycopg://afina:{DB_PASSWORD}@db.internal:5432/afina failed; "
            f"key {stack.api_key}; HF_TOKEN={HUB_TOKEN}; AFINA_DATA_ENCRYPTION_KEY={FERNET_KEY}; "
            f"s3 credentials {S3_ACCESS_KEY} {S3_SECRET_KEY}")


def test_a_crashing_stage_gives_the_user_an_error_id_and_the_log_the_detail(stack: Stack) -> None:
    marker = f"kaboom-{secrets.token_hex(6)}"

    def crash(_context: JobContext) -> str | None:
        raise RuntimeError(f"{marker}: {_every_canary(stack)} at /srv/afina/work/secret/path.py")

    job_id = stack.create_job(stack.upload(), "crash")
    assert run_stage(stack.runtime, job_id, "ingest", crash) == "failed"

    job = stack.read_everything_of(job_id)
    assert job["status"] == "failed"
    message = job["error"]["message"]
    # a generic message: not the exception's text, not its type, not a path
    assert marker not in message and "RuntimeError" not in message and "/srv/afina" not in message
    found = ERROR_ID.search(message)
    assert found, f"no error id in the job's error: {message!r}"
    events = stack.call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    assert not any(marker in event["message"] for event in events)

    # the operator finds the detail under that id (scrubbed: the leak check below covers it)
    detailed = [line for line in stack.log.lines if found.group(0) in line]
    assert detailed, f"error id {found.group(0)} appears in no log line"
    assert any(marker in line for line in detailed)
    # the canaries did reach the logging system: it is the scrubber that kept them out of every line
    assert any(DB_PASSWORD in text and FERNET_KEY in text for text in stack.log.unscrubbed)
    assert stack.leaks() == {}


def test_a_typed_error_carrying_secrets_is_scrubbed_for_the_user(stack: Stack) -> None:
    def refuse(_context: JobContext) -> str | None:
        raise InvalidRequest(f"the training file is unusable ({_every_canary(stack)})", param="training_file")

    job_id = stack.create_job(stack.upload(), "typed")
    assert run_stage(stack.runtime, job_id, "ingest", refuse) == "failed"
    job = stack.read_everything_of(job_id)
    assert job["status"] == "failed"
    assert job["error"]["message"].startswith("the training file is unusable")
    assert stack.leaks() == {}
