"""The ingest stage of a job whose base model is in the object store (``store://models/<tenant>/...``): its
family and tokenizer are read through the store, and the stage succeeds. The worker also checks again what
the tenant's options name (a path outside the allowed dirs, a key variable not allowed) before any work."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.ingest.prepare import prepare_dataset
from tests.support.jobs import create_job, sample_examples, upload_file
from tests.support.models import materialized_base_model

pytestmark = pytest.mark.integration
STORE_MODEL = "store://models/acme/smol-base"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialized_base_model(tmp_path_factory)


@pytest.fixture
def runtime(afina_home: Path, tmp_path: Path, smollm2_dir: Path) -> Runtime:
    # a model cache of its own: the store model's tokenizer is built from the store, not found ready
    runtime = Runtime(Settings(home=afina_home, log_json=False, model_cache_dir=tmp_path / "model-cache",
                               encryption_key_envs={"acme": ["ACME_FERNET_KEY"]}))
    runtime.store.upload_dir(smollm2_dir, STORE_MODEL.removeprefix("store://"))
    return runtime


def jsonl(records: list) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def job_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def test_a_job_on_a_store_base_model_gets_through_ingest(runtime: Runtime) -> None:
    examples = sample_examples(30)
    upload = upload_file(runtime, "acme", jsonl(examples))
    job = create_job(runtime, "acme", upload.id, model=STORE_MODEL)
    outcome = run_stage(runtime, job.id, "ingest", prepare_dataset)
    row = job_row(runtime, job.id)
    assert outcome == "done" and row.error is None, row.error
    assert row.status == "queued" and row.stage == "train" and row.dataset_key
    manifest = orjson.loads(runtime.store.get_bytes(f"{row.dataset_key}/manifest.json"))
    assert manifest["model"] == STORE_MODEL and manifest["options"]["base_model"] == STORE_MODEL
    assert manifest["counts"]["train"] + manifest["counts"]["validation"] == len(examples)
    # measured with the store model's own tokenizer, built from the store into this worker's cache
    assert list((runtime.settings.resolved_model_cache_dir / "base").glob("*/tokenizer/tokenizer.json"))


def test_a_file_whose_base_model_option_is_a_store_model_is_ingested(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(30)), ingest_options={"base_model": STORE_MODEL})
    job = create_job(runtime, "acme", upload.id)
    outcome = run_stage(runtime, job.id, "ingest", prepare_dataset)
    row = job_row(runtime, job.id)
    assert outcome == "done" and row.error is None, row.error
    manifest = orjson.loads(runtime.store.get_bytes(f"{row.dataset_key}/manifest.json"))
    assert manifest["model"] == STORE_MODEL


@pytest.mark.parametrize(("options", "code"), [
    ({"base_model": "/etc"}, "model_path_not_allowed"),
    ({"base_model": "store://models/globex/base"}, "invalid_request"),
    ({"encryption": {"key_env": "AFINA_S3_SECRET_KEY", "fields": ["messages.content"]}}, "key_env_not_allowed"),
    ({"encryption": {"key_env": "ACME_FERNET_KEY", "fields": ["messages.content"]}}, "key_env_not_allowed"),
])
def test_the_worker_refuses_what_the_tenant_may_not_name(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                                                         options: dict, code: str) -> None:
    # options written straight to the row (as an upload from before the gateway checked them would be)
    monkeypatch.delenv("ACME_FERNET_KEY", raising=False)  # allowed for acme, but not set on this worker
    monkeypatch.setenv("AFINA_S3_SECRET_KEY", "not-a-fernet-key")
    upload = upload_file(runtime, "acme", jsonl(sample_examples(12)), ingest_options=options)
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "failed"
    row = job_row(runtime, job.id)
    assert row.status == "failed" and row.error["code"] == code, row.error
    assert row.error["param"] == "training_file" and "train.jsonl" in row.error["message"]
    assert "not-a-fernet-key" not in row.error["message"] and "/etc" not in row.error["message"].replace("'/etc'", "")
