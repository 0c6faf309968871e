"""What a tenant may name, over HTTP: a base model on the server's filesystem only under the operator's allowed
directories (one answer for every other path), another tenant's store model never, and ``encryption.key_env``
only from the tenant's own set; a model folder whose files are broken is a 400 saying so."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from afina.core.catalog import CATALOG, FAMILIES
from tests.integration.gateway.conftest import SMOLLM2, Gateway, chat_jsonl, make_settings, start_gateway
from tests.integration.gateway.test_files_ingest_options import post_file, rows

CONFIG = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
          "vocab_size": 1000, "num_attention_heads": 4, "max_position_embeddings": 4096}


def model_folder(path: Path, config: Any = CONFIG) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": FAMILIES["qwen3"].stock_template}))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    allowed = root / "operator-models"
    model_folder(allowed / "qwen-suporte")
    model_folder(allowed / "config-is-a-list", config=["model_type", "qwen3"])
    nested = struct.pack("<Q", 8) + b"x.nested" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 3000
    (allowed / "nested.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + nested)
    model_folder(root / "elsewhere" / "other-tenant-export")
    return {"root": root, "allowed": allowed}


@pytest.fixture(scope="module")
def gateway(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    settings = make_settings(tmp_path_factory.mktemp("home"), allowed_model_dirs=[dirs["allowed"]],
                             encryption_key_envs={"acme": ["ACME_FERNET_KEY"], "*": ["SHARED_FERNET_KEY"]})
    served = start_gateway(settings)
    store = served.runtime.store
    for tenant in ("acme", "globex"):
        store.put_bytes(f"models/{tenant}/base/config.json", json.dumps({"model_type": "llama"}).encode())
        store.put_bytes(f"models/{tenant}/base/tokenizer_config.json",
                        json.dumps({"chat_template": CATALOG[SMOLLM2].family.stock_template}).encode())
    yield served
    served.served.stop()
    served.runtime.db.dispose()


@pytest.fixture(scope="module")
def training_file(gateway: Gateway) -> str:
    response = post_file(gateway, "train.jsonl", chat_jsonl())
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(gateway: Gateway, model: str, training_file: str, tenant: str = "acme") -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/fine_tuning/jobs", timeout=60,
                      headers={"Authorization": f"Bearer {gateway.keys[tenant]}"},
                      json={"model": model, "training_file": training_file})


def without(name: str, response: httpx.Response) -> str:
    """The error body with the name the caller sent taken out (it may echo what the caller sent, nothing else)."""
    return response.text.replace(json.dumps(name)[1:-1], "<name>").replace(repr(name), "<name>")


def test_a_path_outside_the_allowed_dirs_is_one_answer_whatever_it_is(gateway: Gateway, dirs: dict[str, Path],
                                                                     training_file: str) -> None:
    names = [str(dirs["root"] / "elsewhere" / "other-tenant-export"),  # exists, a valid model
             str(dirs["root"] / "elsewhere" / "missing"), str(dirs["allowed"] / ".." / "elsewhere"),
             f"file://{dirs['root']}/elsewhere/other-tenant-export", "~/.cache", "/etc/passwd.gguf",
             str(CATALOG[SMOLLM2].gguf_path())]  # the packaged GGUF by path is a path like any other
    answers = {}
    for name in names:
        response = create_job(gateway, name, training_file)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["code"] == "model_path_not_allowed"
        answers[name] = without(name, response)
    assert len(set(answers.values())) == 1, answers
    assert str(dirs["root"]) not in next(iter(answers.values()))


def test_a_model_folder_under_an_allowed_dir_trains(gateway: Gateway, dirs: dict[str, Path],
                                                    training_file: str) -> None:
    folder = dirs["allowed"] / "qwen-suporte"
    response = create_job(gateway, str(folder), training_file)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == str(folder)
    assert create_job(gateway, SMOLLM2, training_file).status_code == 200  # the catalog id, as the CLI sends it


@pytest.mark.parametrize(("name", "code", "says"), [
    ("config-is-a-list", "invalid_model_config", "config.json is a JSON array, not an object"),
    ("nested.gguf", "invalid_gguf", "nested more than"),
])
def test_a_broken_model_under_an_allowed_dir_is_a_400_saying_what(gateway: Gateway, dirs: dict[str, Path],
                                                                  training_file: str, name: str, code: str,
                                                                  says: str) -> None:
    response = create_job(gateway, str(dirs["allowed"] / name), training_file)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "model") and says in error["message"]


@pytest.mark.parametrize("options_first", [True, False], ids=["options-first", "options-after-file"])
@pytest.mark.parametrize(("options", "param", "code"), [
    ({"base_model": "/etc"}, "ingest_options.base_model", "model_path_not_allowed"),
    ({"base_model": "file:///etc/shadow.gguf"}, "ingest_options.base_model", "model_path_not_allowed"),
    ({"base_model": "store://models/globex/base"}, "ingest_options.base_model", "invalid_request"),
    ({"encryption": {"key_env": "AFINA_S3_SECRET_KEY", "fields": ["prompt"]}},
     "ingest_options.encryption.key_env", "key_env_not_allowed"),
    ({"encryption": {"key_env": "PATH", "whole_file": True}}, "ingest_options.encryption.key_env",
     "key_env_not_allowed"),
])
def test_upload_options_name_only_what_the_tenant_may(gateway: Gateway, options: dict, param: str, code: str,
                                                      options_first: bool) -> None:
    before = len(rows(gateway, "acme"))
    response = post_file(gateway, "train.jsonl", chat_jsonl(), options, options_first=options_first)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert len(rows(gateway, "acme")) == before  # nothing stored


def test_an_unset_allowed_variable_is_not_told_apart_at_upload(gateway: Gateway) -> None:
    # the gateway checks the set; whether the variable is set on the worker is the worker's (same answer there)
    refused = post_file(gateway, "train.jsonl", chat_jsonl(),
                        {"encryption": {"key_env": "GLOBEX_FERNET_KEY", "fields": ["prompt"]}})
    assert refused.status_code == 400
    for key_env in ("ACME_FERNET_KEY", "SHARED_FERNET_KEY"):
        accepted = post_file(gateway, "train.jsonl", chat_jsonl(), {"encryption": {"key_env": key_env,
                                                                                   "fields": ["prompt"]}})
        assert accepted.status_code == 200, accepted.text


def test_the_tenants_own_store_model_and_an_allowed_path_are_accepted_as_base_model(
        gateway: Gateway, dirs: dict[str, Path]) -> None:
    for base_model in ("store://models/acme/base", str(dirs["allowed"] / "qwen-suporte")):
        response = post_file(gateway, "train.jsonl", chat_jsonl(), {"base_model": base_model})
        assert response.status_code == 200, (base_model, response.text)
