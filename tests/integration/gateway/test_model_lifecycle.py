"""After training: a model's exported files listed and downloaded (whole, and resumed with ``Range``), a
re-export queued as a tracked job of its own (not a fine-tuning job), export options checked when a job is
created, and ``DELETE /v1/models/{model}`` in OpenAI's shape — each scoped to the tenant."""

from __future__ import annotations

import hashlib
import time

import httpx
import openai
import pytest

from afina.core.artifacts import ExportManifest, FileEntry
from afina.core.datasets.layout import adapter_prefix, model_prefix
from afina.core.db import repository as repo
from afina.core.naming import fine_tuned_model_name
from tests.integration.gateway.conftest import SMOLLM2, Gateway
from tests.support.gateway_objects import served_artifacts
from tests.support.jobs import create_job
from tests.support.ollama_server import contract_ollama  # noqa: F401

GGUF_BYTES = bytes(range(256)) * 5000  # 1.28 MB: more than one store chunk


def register_exported(gateway: Gateway, tenant: str = "acme") -> str:
    """A fine-tune with an export manifest and its files in the store, as the exporter leaves one."""
    runtime = gateway.runtime
    job = create_job(runtime, tenant, "file-test", stage="done", status="succeeded",
                     suffix=f"life{time.time_ns() % 10**6}")
    prefix = model_prefix(tenant, job.id)
    entries = {name: FileEntry.of(runtime.store.put_bytes(f"{prefix}/{name}", data)) for name, data in (
        ("model-f16.gguf", GGUF_BYTES * 2), ("model-q4_k_m.gguf", GGUF_BYTES), ("Modelfile", b"FROM x\n"),
        ("verification.json", b"{}"))}
    name = fine_tuned_model_name(SMOLLM2, tenant, job.suffix, job.id)
    manifest = ExportManifest.build(
        name=name, job_id=job.id, tenant_id=tenant, base_model=SMOLLM2, family="chatml", serve="q4_k_m",
        adapter=adapter_prefix(tenant, job.id), gguf={"f16": entries["model-f16.gguf"],
                                                      "q4_k_m": entries["model-q4_k_m.gguf"]},
        modelfile=entries["Modelfile"], verification=entries["verification.json"], created_at=1)
    manifest.write(runtime.store, f"{prefix}/manifest.json")
    with runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id=tenant, base_model=SMOLLM2, job_id=job.id,
                            artifacts=served_artifacts(tenant, job.id, {"f16": entries["model-f16.gguf"].key,
                                                                        "q4_k_m": entries["model-q4_k_m.gguf"].key}))
    return name


def http(gateway: Gateway, tenant: str = "acme") -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.keys[tenant]}"},
                        timeout=60)


def test_files_are_listed_and_downloaded_whole_and_by_range(gateway: Gateway) -> None:
    name = register_exported(gateway)
    with http(gateway) as client:
        listing = client.get(f"/v1/models/{name}/files").json()["data"]
        by_name = {item["filename"]: item for item in listing}
        assert set(by_name) == {"model-f16.gguf", "model-q4_k_m.gguf", "Modelfile", "verification.json"}
        served = by_name["model-q4_k_m.gguf"]
        assert served["served"] and served["variant"] == "q4_k_m" and served["bytes"] == len(GGUF_BYTES)
        assert served["sha256"] == hashlib.sha256(GGUF_BYTES).hexdigest()

        whole = client.get(served["download_url"])
        assert whole.status_code == 200 and whole.content == GGUF_BYTES
        assert whole.headers["accept-ranges"] == "bytes" and whole.headers["etag"] == f'"{served["sha256"]}"'
        resumed = client.get(served["download_url"], headers={"Range": "bytes=1000000-"})
        assert resumed.status_code == 206 and resumed.content == GGUF_BYTES[1_000_000:]
        assert resumed.headers["content-range"] == f"bytes 1000000-{len(GGUF_BYTES) - 1}/{len(GGUF_BYTES)}"
        tail = client.get(served["download_url"], headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == GGUF_BYTES[-10:]
        outside = client.get(served["download_url"], headers={"Range": f"bytes={len(GGUF_BYTES)}-"})
        assert outside.status_code == 416 and outside.json()["error"]["param"] == "Range"
        assert client.get(f"/v1/models/{name}/files/../manifest.json").status_code == 404
        assert client.get(f"/v1/models/{name}/files/adapter_model.safetensors").status_code == 404
    with http(gateway, "globex") as other:  # another tenant's model is a missing one
        assert other.get(f"/v1/models/{name}/files").status_code == 404
        assert other.get(served["download_url"]).status_code == 404


def test_a_re_export_is_a_tracked_job_and_not_a_fine_tuning_job(gateway: Gateway, acme) -> None:  # noqa: ANN001
    name = register_exported(gateway)
    with http(gateway) as client:
        created = client.post(f"/v1/models/{name}/exports", json={"quantizations": ["Q5_K_M", "q8_0"],
                                                                  "serve": "q5_k_m"})
        assert created.status_code == 200, created.text
        export = created.json()
        assert export["object"] == "model.export" and export["model"] == name and export["status"] == "queued"
        assert export["options"] == {"quantizations": ["q5_k_m", "q8_0"], "serve": "q5_k_m"}
        again = client.get(f"/v1/models/{name}/exports/{export['id']}").json()
        assert again["id"] == export["id"]
        events = client.get(f"/v1/models/{name}/exports/{export['id']}/events").json()["data"]
        assert [event["message"] for event in events] == [f"Export of {name} queued"]
        refused = client.post(f"/v1/models/{name}/exports", json={"quantizations": ["q3_xl"]})
        assert refused.status_code == 400 and "quantizations" in refused.text
        no_ollama = client.post(f"/v1/models/{name}/exports", json={"ollama": True})
        assert no_ollama.status_code == 400 and no_ollama.json()["error"]["param"] == "body.ollama"
        secret_env = client.post(f"/v1/models/{name}/exports", json={"hub": {"repo": "ana/aeon",
                                                                            "token_env": "AFINA_S3_SECRET_KEY"}})
        assert secret_env.status_code == 400 and secret_env.json()["error"]["code"] == "token_env_not_allowed"
    assert export["id"] not in {job.id for job in acme.fine_tuning.jobs.list(limit=100)}
    with gateway.runtime.db.session() as session:
        row = repo.get_job(session, "acme", export["id"])
    assert row.kind == "export" and row.stage == "export" and row.method["export"]["model"] == name


def test_export_options_are_checked_and_stored_with_a_new_job(gateway: Gateway, acme, upload) -> None:  # noqa: ANN001
    training = upload()
    job = acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id,
                                       extra_body={"export": {"quantizations": ["q8_0"], "hub": {"repo": "aeon"}}})
    with gateway.runtime.db.session() as session:
        assert repo.get_job(session, "acme", job.id).export_options == {"quantizations": ["q8_0"],
                                                                          "hub": {"repo": "aeon"}}
    with pytest.raises(openai.BadRequestError) as caught:
        acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id,
                                     extra_body={"export": {"quantizations": ["q4_k_m"], "serve": "q8_0"}})
    assert "serve" in caught.value.message


def test_delete_answers_openais_shape_and_removes_the_files(gateway: Gateway, acme) -> None:  # noqa: ANN001
    name = register_exported(gateway)
    with http(gateway, "globex") as other:
        assert other.delete(f"/v1/models/{name}").status_code == 404  # not theirs: untouched
    deleted = acme.models.delete(name)
    assert deleted.id == name and deleted.deleted is True
    assert name not in {model.id for model in acme.models.list().data}
    with pytest.raises(openai.NotFoundError):
        acme.models.retrieve(name)
    job_id = name.rsplit(":", 1)[-1]
    assert not gateway.runtime.store.list(model_prefix("acme", job_id) + "/")
    with pytest.raises(openai.NotFoundError):
        acme.models.delete(name)


def test_afina_pull_resumes_a_partial_download_and_checks_the_sha256(gateway: Gateway, tmp_path) -> None:  # noqa: ANN001
    from afina.cli.datasets import CliError
    from afina.cli.models import pull

    name = register_exported(gateway)
    base_url, key = f"{gateway.url}/v1", gateway.keys["acme"]
    target = tmp_path / "model.gguf"
    target.with_name("model.gguf.part").write_bytes(GGUF_BYTES[:700_000])  # a download that broke
    pull(base_url, key, name, None, target)  # the served variant, resumed with a Range request
    assert target.read_bytes() == GGUF_BYTES and not target.with_name("model.gguf.part").exists()
    f16 = tmp_path / "f16.gguf"
    pull(base_url, key, name, "F16", f16)
    assert f16.read_bytes() == GGUF_BYTES * 2
    broken = tmp_path / "broken.gguf"
    broken.with_name("broken.gguf.part").write_bytes(b"\0" * 700_000)  # a partial file that is not this model
    with pytest.raises(CliError) as caught:
        pull(base_url, key, name, None, broken)
    assert "does not match its sha256" in caught.value.message
    assert not broken.exists() and not broken.with_name("broken.gguf.part").exists()
    with pytest.raises(CliError) as caught:
        pull(base_url, key, name, "q6_k", tmp_path / "none.gguf")
    assert "has no q6_k GGUF" in caught.value.message


@pytest.mark.slow
def test_delete_removes_the_model_from_ollama_first(gateway: Gateway, tmp_path, contract_ollama) -> None:  # noqa: ANN001, F811
    from afina.core.catalog import CATALOG, resolve_base_model
    from afina.core.errors import ServiceUnavailable
    from afina.core.runtime import Runtime
    from afina.exporter.ollama import register_model_in_ollama
    from afina.gateway.models.exports import delete_model

    runtime = Runtime(gateway.runtime.settings.model_copy(update={"ollama_url": contract_ollama.url}))
    name = register_exported(gateway)
    registration = register_model_in_ollama(url=contract_ollama.url, name="acme-aeon", family=CATALOG[SMOLLM2].family,
                                            gguf_path=resolve_base_model(SMOLLM2).gguf_path(), system=None,
                                            num_ctx=512, timeout_s=60)
    assert registration.status == "registered"
    with runtime.db.session() as session:
        repo.get_model(session, "acme", name).ollama = registration.model_dump(mode="json")
    contract_ollama.go_down()
    with pytest.raises(ServiceUnavailable, match="was not deleted"):
        delete_model(runtime, "acme", name)
    with runtime.db.session() as session:
        assert repo.get_model(session, "acme", name) is not None  # nothing deleted while Ollama is away
    contract_ollama.come_back()
    assert delete_model(runtime, "acme", name).deleted
    assert not [model for model in contract_ollama.model_names() if model.startswith("acme-aeon")]
    with runtime.db.session() as session:
        assert repo.get_model(session, "acme", name) is None
