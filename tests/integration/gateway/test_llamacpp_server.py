"""The ``llamacpp-server`` backend: one real ``llama_cpp.server`` per model, proxied, stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.servers import free_port

# `make install` installs llama-cpp-python[server]; a missing server dependency is a failure here, not a skip
pytestmark = [pytest.mark.integration, pytest.mark.slow]
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _llama_servers() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True)
            if "llama_cpp.server" in " ".join(child.cmdline())]


@pytest.fixture
def server_gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = make_settings(tmp_path / "home", inference_backend="llamacpp-server",
                             llamacpp_server_base_port=free_port(), max_loaded_models=1)
    gateway = start_gateway(settings, tenants=("acme",))
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


def test_chat_through_a_llama_cpp_server(server_gateway: Gateway) -> None:
    client = server_gateway.client("acme")
    assert _llama_servers() == []  # nothing starts before the first request

    completion = client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=8, temperature=0,
                                                seed=5)
    assert completion.model == SMOLLM2 and completion.choices[0].message.content
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    servers = _llama_servers()
    assert len(servers) == 1

    chunks = list(client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 seed=5, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == completion.choices[0].message.content
    assert all(chunk.model == SMOLLM2 for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens > 0
    assert _llama_servers() == servers  # the same server serves every request for the model

    server_gateway.served.stop()  # shutdown stops the server by its PID
    psutil.wait_procs(servers, timeout=15)
    assert not any(server.is_running() and server.status() != psutil.STATUS_ZOMBIE for server in servers)
