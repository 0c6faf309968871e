"""A gateway and a real ingest worker process sharing one embedded home: uploads are ingested as in production.

The gateway serves in this process (uvicorn on loopback); the worker is ``celery -A afina.core.queue.worker``
on the ``ingest`` queue of the filesystem broker, with the session's shared model cache so the tokenizer
is built once. Requests go through plain HTTP (multipart built here), so each test sees exactly the status
code and body a client would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.gateway.conftest import Gateway, make_settings, start_gateway
from tests.support.models import shared_model_cache
from tests.support.servers import stop_process

UPLOAD_LIMIT = 64 * 1024 * 1024


@dataclass
class IngestStack:
    gateway: Gateway
    worker: subprocess.Popen
    worker_log: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    def headers(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.gateway.keys[tenant]}"}

    def upload(self, name: str, content: bytes, options: dict[str, Any] | None = None,
               tenant: str = "acme") -> httpx.Response:
        """``POST /v1/files`` (purpose fine-tune), ``ingest_options`` before the file as the CLI sends them."""
        data = {"purpose": "fine-tune"}
        if options is not None:
            data["ingest_options"] = json.dumps(options)
        return httpx.post(f"{self.url}/v1/files", data=data, files={"file": (name, content)},
                          headers=self.headers(tenant), timeout=120)

    def ingest(self, file_id: str, tenant: str = "acme") -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/files/{file_id}/ingest", headers=self.headers(tenant), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, file_id: str, timeout: float = 180, tenant: str = "acme") -> dict[str, Any]:
        """Poll until the worker has processed the file (or failed it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.ingest(file_id, tenant)
            if status["status"] in ("processed", "error"):
                return status
            if self.worker.poll() is not None:
                raise AssertionError(f"the ingest worker exited; log:\n{self.worker_log.read_text()[-4000:]}")
            time.sleep(0.3)
        raise AssertionError(f"{file_id} not ingested in {timeout}s; worker log:\n"
                             f"{self.worker_log.read_text()[-4000:]}")

    def report(self, file_id: str, tenant: str = "acme") -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/v1/files/{file_id}/ingest/report", headers=self.headers(tenant),
                             timeout=60)
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def still_serving(self) -> None:
        """The gateway answers after whatever came before (no 500, no hang)."""
        assert httpx.get(f"{self.url}/health", timeout=10).json() == {"status": "ok"}
        listing = httpx.get(f"{self.url}/v1/files", headers=self.headers(), timeout=10)
        assert listing.status_code == 200


def start_ingest_worker(home: Path, model_cache: Path, log_path: Path) -> subprocess.Popen:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AFINA_")}
    env.update(AFINA_HOME=str(home), AFINA_MODEL_CACHE_DIR=str(model_cache), AFINA_WORKER_SERVICES="ingest",
               AFINA_LOG_JSON="false", AFINA_INGEST_PROGRESS_EVERY="1000")
    command = [sys.executable, "-m", "celery", "-A", "afina.core.queue.worker", "worker", "-Q", "ingest",
               "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    return subprocess.Popen(command, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)


@pytest.fixture(scope="package")
def ingest_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestStack]:
    home = tmp_path_factory.mktemp("ingest-home")
    model_cache = shared_model_cache(tmp_path_factory)
    # the tokenizer-only cache is built once here, not inside the first test's wait
    from afina.core.catalog import resolve_base_model
    from afina.ingest.tokens import load_tokenizer

    load_tokenizer(resolve_base_model("smollm2-135m-instruct"), model_cache)
    gateway = start_gateway(make_settings(home, max_upload_bytes=UPLOAD_LIMIT, model_cache_dir=model_cache))
    log_path = tmp_path_factory.mktemp("ingest-worker") / "worker.log"
    worker = start_ingest_worker(home, model_cache, log_path)
    try:
        yield IngestStack(gateway=gateway, worker=worker, worker_log=log_path)
    finally:
        stop_process(worker)
        gateway.served.stop()
        gateway.runtime.db.dispose()
