"""A real gateway for the integration tests: uvicorn on loopback, SQLite and a local store in a temp home,
llama.cpp in process, and two tenants with their own API keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import ServedApp, serve_app

SMOLLM2 = "smollm2-135m-instruct"


@dataclass
class Gateway:
    served: ServedApp
    runtime: Any  # afina.core.runtime.Runtime
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.served.url

    def client(self, tenant: str = "acme", **options: Any):  # noqa: ANN201 - openai.OpenAI
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=120, **options)


def make_settings(home: Path, **overrides: Any):  # noqa: ANN201 - Settings
    """Embedded-mode settings, explicit about everything the environment could otherwise change."""
    from afina.core.settings import Settings

    values: dict[str, Any] = {"home": home, "log_json": False, "environment": "local", "database_url": None,
                              "broker_url": None, "store_backend": "local", "store_root": None,
                              "work_dir": None, "model_cache_dir": None, "inference_backend": "inprocess",
                              "inference_n_ctx": 1024, "max_loaded_models": 2, "max_upload_bytes": 4 * 1024 * 1024}
    values.update(overrides)
    return Settings(**values)


def start_gateway(settings: Any, tenants: tuple[str, ...] = ("acme", "globex")) -> Gateway:
    from afina.core.db import repository as repo
    from afina.core.runtime import Runtime
    from afina.gateway.app import create_app

    runtime = Runtime(settings)
    with runtime.db.session() as session:
        keys = {tenant: repo.create_api_key(session, tenant) for tenant in tenants}
    return Gateway(served=serve_app(create_app(runtime)), runtime=runtime, keys=keys)


@pytest.fixture(scope="package")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the package's tests (the model stays loaded between chat tests)."""
    served = start_gateway(make_settings(tmp_path_factory.mktemp("gateway-home")))
    yield served
    served.served.stop()
    served.runtime.db.dispose()


@pytest.fixture(scope="package")
def fine_tune(gateway: Gateway) -> str:
    """A registered fine-tune of acme whose served artifact is the SmolLM2 GGUF, put into the store."""
    return register_fine_tune(gateway)


def register_fine_tune(gateway: Gateway) -> str:
    """Register acme's fine-tune on ``gateway`` (once per job id: a second call updates it) and return its name."""
    from afina.core.catalog import resolve_base_model
    from afina.core.datasets.layout import model_prefix
    from afina.core.db import repository as repo
    from afina.core.naming import fine_tuned_model_name
    from tests.support.gateway_objects import served_artifacts

    job_id = "ftjob-" + "ab" * 12
    name = fine_tuned_model_name(SMOLLM2, "acme", "greeter", job_id)
    key = f"{model_prefix('acme', job_id)}/model-q4_k_m.gguf"
    gateway.runtime.store.put_file(key, resolve_base_model(SMOLLM2).gguf_path())
    with gateway.runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id="acme", base_model=SMOLLM2, job_id=job_id,
                            artifacts=served_artifacts("acme", job_id, {"q4_k_m": key, "q8_0": key + ".missing",
                                                                        "f16": key + ".missing"}))
    return name


@pytest.fixture
def acme(gateway: Gateway):  # noqa: ANN201 - openai.OpenAI
    return gateway.client("acme")


@pytest.fixture
def globex(gateway: Gateway):  # noqa: ANN201 - openai.OpenAI
    return gateway.client("globex")


def chat_jsonl(examples: int = 12) -> bytes:
    import json

    lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]})
             for i in range(examples)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def upload(acme) -> Callable[..., Any]:  # noqa: ANN001
    """Upload a small valid training file for acme (or another client) and return the file object."""

    def do(client: Any = None, content: bytes | None = None, name: str = "train.jsonl") -> Any:
        return (client or acme).files.create(file=(name, content or chat_jsonl()), purpose="fine-tune")

    return do
