"""A llama.cpp server that cannot start: the user gets a short 503 with an error id, the operator the log tail.

The model is a registered fine-tune whose GGUF is not a GGUF, so a real ``llama_cpp.server`` exits while
loading it. The model cache sits under a folder whose name holds a canary secret: the server prints the model's
path in its traceback, so the canary is in the log tail, and must reach neither the user nor the log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from afina.core.datasets.layout import model_prefix
from afina.core.db import repository as repo
from afina.core.errors import InferenceUnavailable
from afina.core.logging import JsonFormatter, KeyValueFormatter
from afina.core.naming import fine_tuned_model_name
from afina.gateway.inference.base import GenerationRequest, ServedModel
from afina.gateway.inference.llamacpp_server import LlamaServerBackend
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.gateway_objects import served_artifacts
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration]
MESSAGES = [{"role": "user", "content": "Name a colour."}]
CANARY = "cnry" + secrets.token_hex(10)


@pytest.fixture
def broken_model_gateway(tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    cache = tmp_path / f"AFINA_S3_SECRET_KEY={CANARY}" / "models"
    settings = make_settings(tmp_path / "home", inference_backend="llamacpp-server", model_cache_dir=cache,
                             llamacpp_server_base_port=free_port(), max_loaded_models=1)
    gateway = start_gateway(settings, tenants=("acme",))
    job_id = "ftjob-" + "cd" * 12
    name = fine_tuned_model_name(SMOLLM2, "acme", "broken", job_id)
    key = f"{model_prefix('acme', job_id)}/model-q4_k_m.gguf"
    gateway.runtime.store.put_bytes(key, b"NOT A GGUF " * 64)
    with gateway.runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id="acme", base_model=SMOLLM2, job_id=job_id,
                            artifacts=served_artifacts("acme", job_id, {"q4_k_m": key}))
    yield gateway, name
    gateway.served.stop()
    gateway.runtime.db.dispose()


def test_a_server_that_cannot_start_answers_503_with_an_error_id(broken_model_gateway: tuple[Gateway, str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    gateway, name = broken_model_gateway
    caplog.set_level(logging.INFO, logger="afina")
    with pytest.raises(openai.InternalServerError) as caught:
        gateway.client("acme").chat.completions.create(model=name, messages=MESSAGES, max_tokens=4)

    assert caught.value.status_code == 503
    error = caught.value.body
    assert error["code"] == "model_unavailable"
    message = error["message"]
    found = re.search(r"error id (err_[0-9a-f]{16})", message)
    assert found, message
    assert message.startswith("The model could not be started")
    # nothing of the server's log: no path, no library internals, no secret
    for leaked in (CANARY, "/", "Failed to load", "Traceback", "llama", "exited with"):
        assert leaked not in message

    failures = [record for record in caplog.records if record.getMessage() == "llamacpp_server.start_failed"]
    assert len(failures) == 1
    fields = failures[0].fields
    assert fields["error_id"] == found.group(1)
    assert "Failed to load model" in fields["log_tail"] and fields["returncode"] != 0
    for formatter in (JsonFormatter(), KeyValueFormatter()):
        line = formatter.format(failures[0])
        assert found.group(1) in line and "Failed to load model" in line
        assert CANARY not in line and "AFINA_S3_SECRET_KEY=***" in line


def test_the_backend_answers_a_server_that_cannot_start_with_an_error_id(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The same promise, of the backend driven directly (no gateway in between)."""
    cache = tmp_path / f"AFINA_S3_SECRET_KEY={CANARY}" / "models"
    cache.mkdir(parents=True)
    broken = cache / "model-q4_k_m.gguf"
    broken.write_bytes(b"NOT A GGUF " * 64)
    backend = LlamaServerBackend(make_settings(tmp_path / "home", inference_backend="llamacpp-server",
                                               llamacpp_server_base_port=free_port()))
    request = GenerationRequest(model=ServedModel(name="broken", path=broken), messages=MESSAGES)
    caplog.set_level(logging.INFO, logger="afina")

    with pytest.raises(InferenceUnavailable) as caught:
        asyncio.run(backend.generate(request))

    message = caught.value.message
    assert message.startswith("The model could not be started; error id err_")
    assert CANARY not in message and "/" not in message
    failure = next(record for record in caplog.records if record.getMessage() == "llamacpp_server.start_failed")
    assert failure.fields["error_id"] in message and "Failed to load model" in failure.fields["log_tail"]
    assert asyncio.run(backend.loaded()) == []  # nothing left running
