"""A job whose base model is a ``store://`` model goes through every stage: the base model is resolved once
at creation (family and size read through the store) and stored with the job; ingest measures with its
tokenizer, the trainer trains it and commits an adapter naming it, the exporter merges into it and
registers a GGUF that answers. No stage resolves the name again without the store (the bug this guards)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from afina.core.artifacts import ADAPTER_MARKER, AdapterManifest, ExportManifest, ServedArtifacts
from afina.core.datasets.layout import adapter_prefix
from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.core.training import FineTuningRequest
from afina.exporter.pipeline import export_job
from afina.gateway.fine_tuning.service import create_job
from afina.ingest.prepare import prepare_dataset
from afina.trainer.recipe import train_job
from tests.support.jobs import sample_examples, upload_file
from tests.support.models import materialized_base_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STORE_MODEL = "store://models/acme/smol-base"


def jsonl(records: list) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


def test_a_store_base_model_job_trains_exports_and_is_served(tmp_path: Path,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    smollm2_dir = materialized_base_model(tmp_path_factory)
    # a model cache of its own: every stage must build the store model from the store, not find it ready
    runtime = Runtime(Settings(home=tmp_path / "home", model_cache_dir=tmp_path / "model-cache", log_json=False,
                               export_quantizations=["Q8_0"]))
    runtime.store.upload_dir(smollm2_dir, STORE_MODEL.removeprefix("store://"))
    upload = upload_file(runtime, "acme", jsonl(sample_examples(24)))
    job = create_job(runtime, "acme", FineTuningRequest(
        model=STORE_MODEL, training_file=upload.id, suffix="loja",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "max_steps": 2, "batch_size": 2, "max_seq_len": 256, "save_steps": 2}}}))
    with runtime.db.session() as session:
        row = repo.get_job(session, "acme", job.id)
    assert row.base_model is not None
    assert (row.base_model["source"], row.base_model["reference"], row.base_model["family"]) == \
        ("store", STORE_MODEL, "chatml")

    for stage, work in (("ingest", prepare_dataset), ("train", train_job), ("export", export_job)):
        outcome = run_stage(runtime, job.id, stage, work)
        with runtime.db.session() as session:
            row = repo.get_job(session, "acme", job.id)
        assert outcome == "done" and row.error is None, (stage, row.error)

    assert row.status == "succeeded" and row.fine_tuned_model
    assert row.training_config is not None and row.training_config["max_steps"] == 2
    marker = AdapterManifest.read(runtime.store, f"{adapter_prefix('acme', job.id)}/{ADAPTER_MARKER}")
    assert marker is not None and marker.base_model == STORE_MODEL and marker.chat_family == "chatml"
    with runtime.db.session() as session:
        model = repo.get_model(session, "acme", row.fine_tuned_model)
    served = ServedArtifacts.of_row(model.artifacts, model.name)
    manifest = ExportManifest.read(runtime.store, served.manifest)
    assert manifest is not None and manifest.base_model == STORE_MODEL and manifest.serve == "q8_0"
    report = orjson.loads(runtime.store.get_bytes(manifest.verification.key))
    assert report["passed"] is True and report["checks"]["q8_0"]["completion"].strip()
    # the fidelity gate ran on the held-out split: f16 answers like the merged model
    fidelity = report["fidelity"]
    assert fidelity["passed"] and fidelity["prompts"] >= 1 and set(fidelity["variants"]) == {"f16", "q8_0"}
