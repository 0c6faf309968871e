"""The export stage end to end on real components: a LoRA adapter in the store becomes a served, registered model.

No trainer runs: the adapter is a real PEFT LoRA with perturbed B matrices (tests/support/adapters.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from afina.core.datasets.layout import adapter_prefix, model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import File, Model
from afina.core.evaluation_jobs import EVALUATION_JOB_EVENT_KEY, EVALUATION_KIND
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.core.store.base import sha256_file
from afina.exporter.pipeline import export_job
from tests.support.adapters import store_adapter
from tests.support.jobs import context_for, create_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TENANT = "acme"
GGUF_NAMES = ("model-f16.gguf", "model-q4_k_m.gguf", "model-q8_0.gguf")
PHASES = ("merge", "convert", "quantize_q4_k_m", "quantize_q8_0", "verify")


@dataclass
class Exported:
    runtime: Runtime
    job_id: str
    prefix: str


def store_path(runtime: Runtime, key: str) -> Path:
    return runtime.settings.resolved_store_root / key


def job_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def models_of(runtime: Runtime, job_id: str) -> list[Model]:
    with runtime.db.session() as session:
        return [model for model in repo.list_models(session, TENANT) if model.job_id == job_id]


def event_rows(runtime: Runtime, job_id: str) -> list:
    with runtime.db.session() as session:
        events, _ = repo.list_events(session, job_id, None, 100)
    return list(reversed(events))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, exporter_model_cache: Path, base_model_dir: Path,
             lora_adapter_dir: Path) -> Exported:
    """One export on the embedded stack (SQLite, local store), run as the worker would hand it the job."""
    home = tmp_path_factory.mktemp("export-home")
    runtime = Runtime(Settings(home=home, model_cache_dir=exporter_model_cache, log_json=False))
    job = create_job(runtime, TENANT, "file-test", stage="export", status="running", suffix="aeon")
    store_adapter(runtime, TENANT, job.id, lora_adapter_dir)
    # the trainer's report page, published as the job's result file, as the train stage leaves it
    page = runtime.store.put_bytes(f"{report_prefix(job.id)}/report.md", b"# Training report\n\nloss 1.0\n")
    with runtime.db.session() as session:
        file_id = repo.add_result_file(session, TENANT, object_key=page.key, filename="report.md", size=page.size,
                                       sha256=page.sha256 or "").id
        repo.get_job(session, None, job.id).result_files = [file_id]
    context = context_for(runtime, job, "export")
    assert export_job(context) is None
    with runtime.db.session() as session:
        repo.release_lease(session, job.id, context.owner)
    return Exported(runtime, job.id, model_prefix(TENANT, job.id))


def report_prefix(job_id: str) -> str:
    return f"jobs/{TENANT}/{job_id}/report"


def result_files(runtime: Runtime, job_id: str) -> dict[str, File]:
    with runtime.db.session() as session:
        return {row.filename: row for row in (session.get(File, file_id)
                                              for file_id in repo.get_job(session, None, job_id).result_files)}


def test_three_ggufs_modelfile_and_report_with_the_manifest_written_last(exported: Exported) -> None:
    runtime, prefix = exported.runtime, exported.prefix
    keys = [info.key for info in runtime.store.list(prefix + "/")]
    assert sorted(keys) == sorted(f"{prefix}/{name}" for name in
                                  (*GGUF_NAMES, "Modelfile", "verification.json", "manifest.json"))
    manifest_written = store_path(runtime, f"{prefix}/manifest.json").stat().st_mtime_ns
    assert all(store_path(runtime, key).stat().st_mtime_ns <= manifest_written for key in keys)

    manifest = orjson.loads(runtime.store.get_bytes(f"{prefix}/manifest.json"))
    assert manifest["serve"] == "q4_k_m" and manifest["adapter"] == adapter_prefix(TENANT, exported.job_id)
    entries = [*manifest["gguf"].values(), manifest["modelfile"], manifest["verification"]]
    assert sorted(manifest["gguf"]) == ["f16", "q4_k_m", "q8_0"]
    for entry in entries:
        path = store_path(runtime, entry["key"])
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
    sizes = {variant: entry["bytes"] for variant, entry in manifest["gguf"].items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    assert set(manifest["timings"]) == set(PHASES)


def test_job_succeeded_with_one_registered_model(exported: Exported) -> None:
    runtime, job_id, prefix = exported.runtime, exported.job_id, exported.prefix
    row = job_row(runtime, job_id)
    assert row.status == "succeeded" and row.stage == "done" and row.error is None
    assert row.fine_tuned_model == f"ft:smollm2-135m-instruct:{TENANT}:aeon:{job_id}"
    assert re.fullmatch(r"ft:[^:]+:[^:]+:[^:]*:ftjob-[0-9a-f]+", row.fine_tuned_model)
    [model] = models_of(runtime, job_id)
    assert model.name == row.fine_tuned_model and model.base_model == "smollm2-135m-instruct"
    assert model.artifacts == {
        "schema_version": 2,
        "gguf": {"f16": f"{prefix}/model-f16.gguf", "q4_k_m": f"{prefix}/model-q4_k_m.gguf",
                 "q8_0": f"{prefix}/model-q8_0.gguf"},
        "serve": "q4_k_m",
        "modelfile": f"{prefix}/Modelfile",
        "manifest": f"{prefix}/manifest.json",
        "adapter": adapter_prefix(TENANT, job_id),
    }
    events = event_rows(runtime, job_id)
    timed = {event.data["phase"]: event for event in events if event.data and "phase" in event.data}
    assert set(timed) == set(PHASES)
    assert all(re.search(r" in \d+\.\d s$", event.message) for event in timed.values())
    # the registration queued the model's evaluation (its own job), and said so on this job
    queued = [event.data[EVALUATION_JOB_EVENT_KEY] for event in events
              if event.data and EVALUATION_JOB_EVENT_KEY in event.data]
    assert len(queued) == 1 and job_row(runtime, queued[0]).kind == EVALUATION_KIND
    assert not (runtime.settings.resolved_work_dir / job_id).exists()


def test_the_export_section_is_in_the_jobs_report_and_verification_json_in_its_files(exported: Exported) -> None:
    runtime = exported.runtime
    files = result_files(runtime, exported.job_id)
    assert list(files) == ["report.md", "verification.json"]  # the trainer's file keeps its id
    for row in files.values():  # each downloadable as what is in the store now
        assert (row.bytes, row.sha256) == (runtime.store.stat(row.object_key).size,
                                           sha256_file(store_path(runtime, row.object_key)))
    page = runtime.store.get_bytes(f"{report_prefix(exported.job_id)}/report.md").decode()
    assert page.startswith("# Training report") and page.count("## Export and fidelity") == 1
    manifest = orjson.loads(runtime.store.get_bytes(f"{exported.prefix}/manifest.json"))
    for variant in ("f16", "q4_k_m", "q8_0"):
        entry = manifest["gguf"][variant]
        assert f"| {variant} | model-{variant}.gguf | {entry['bytes'] / 1e6:.1f} MB | {entry['sha256'][:12]} |" in page
    # this job has no held-out split: the section says the gate was skipped, and why
    assert "Fidelity gate: skipped — the job has no held-out conversation" in page


def test_verification_report_records_every_check(exported: Exported) -> None:
    report = orjson.loads(exported.runtime.store.get_bytes(f"{exported.prefix}/verification.json"))
    assert report["passed"] is True and report["family"] == "chatml"
    assert sorted(report["checks"]) == ["f16", "q4_k_m", "q8_0"]
    for check in report["checks"].values():
        assert check["passed"] and check["chat_template_matches"] and check["eos_matches"]
        assert check["prompt_tokens_match"] and check["completion"].strip()
        assert check["finish_reason"] == "stop"


def test_quantized_ggufs_load_and_answer_a_chat(exported: Exported, tmp_path: Path) -> None:
    from llama_cpp import Llama

    modelfile = exported.runtime.store.get_bytes(f"{exported.prefix}/Modelfile").decode()
    assert modelfile.startswith("FROM ./model-q4_k_m.gguf\n")
    for name in ("model-q4_k_m.gguf", "model-q8_0.gguf"):
        path = exported.runtime.store.download_file(f"{exported.prefix}/{name}", tmp_path / name)
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False, seed=0)
        try:
            result = llm.create_chat_completion(
                messages=[{"role": "user", "content": "Name a color of the sky."}], temperature=0.0, max_tokens=64)
        finally:
            llm.close()
        answer = result["choices"][0]["message"]["content"]
        assert answer.strip() and "<|im_start|>" not in answer and "<|im_end|>" not in answer, name
        assert result["choices"][0]["finish_reason"] == "stop", (name, answer)


def test_running_the_stage_again_registers_nothing_new(exported: Exported) -> None:
    runtime, job_id, prefix = exported.runtime, exported.job_id, exported.prefix
    written = {info.key: store_path(runtime, info.key).stat().st_mtime_ns for info in runtime.store.list(prefix)}
    row = job_row(runtime, job_id)
    context = context_for(runtime, row, "export")
    assert export_job(context) is None
    with runtime.db.session() as session:
        repo.release_lease(session, job_id, context.owner)
    # as the worker sees a redelivered message: a finished job is skipped
    assert run_stage(runtime, job_id, "export", export_job) == "skipped"
    assert len(models_of(runtime, job_id)) == 1
    after = job_row(runtime, job_id)
    assert after.status == "succeeded" and after.fine_tuned_model == row.fine_tuned_model
    assert {info.key: store_path(runtime, info.key).stat().st_mtime_ns
            for info in runtime.store.list(prefix)} == written
    assert any("already registered" in event.message for event in event_rows(runtime, job_id))


def test_a_resumed_export_reuses_the_stored_gguf_on_postgres_and_s3(
        exported: Exported, tmp_path: Path, exporter_model_cache: Path, lora_adapter_dir: Path,
        postgres_database: str, seaweedfs, bucket_name: str) -> None:  # noqa: ANN001
    """A stage that died after uploading the f16 GGUF resumes at quantization, on the production backends."""
    settings = Settings(home=tmp_path, model_cache_dir=exporter_model_cache, log_json=False,
                        database_url=postgres_database, store_backend="s3", s3_endpoint=seaweedfs.endpoint,
                        s3_access_key=seaweedfs.access_key, s3_secret_key=seaweedfs.secret_key, s3_bucket=bucket_name)
    runtime = Runtime(settings)
    job = create_job(runtime, TENANT, "file-test", stage="export", status="running", suffix=None)
    store_adapter(runtime, TENANT, job.id, lora_adapter_dir)
    prefix = model_prefix(TENANT, job.id)
    stored_f16 = store_path(exported.runtime, f"{exported.prefix}/model-f16.gguf")
    runtime.store.put_file(f"{prefix}/model-f16.gguf", stored_f16)

    assert run_stage(runtime, job.id, "export", export_job) == "done"

    messages = [event.message for event in event_rows(runtime, job.id)]
    assert any("Reusing the 16-bit GGUF" in message for message in messages)
    # merged again (the fidelity gate compares against it) but not converted again
    assert not any(message.startswith("Converted") for message in messages)
    row = job_row(runtime, job.id)
    assert row.status == "succeeded" and row.fine_tuned_model == f"ft:smollm2-135m-instruct:{TENANT}::{job.id}"
    assert len(models_of(runtime, job.id)) == 1
    manifest = orjson.loads(runtime.store.get_bytes(f"{prefix}/manifest.json"))
    original = orjson.loads(exported.runtime.store.get_bytes(f"{exported.prefix}/manifest.json"))
    assert manifest["gguf"]["f16"]["sha256"] == original["gguf"]["f16"]["sha256"]
    assert set(manifest["timings"]) == {"merge", "quantize_q4_k_m", "quantize_q8_0", "verify"}
    assert orjson.loads(runtime.store.get_bytes(f"{prefix}/verification.json"))["passed"] is True
    runtime.db.dispose()


def test_a_manifest_is_reused_only_while_every_file_has_its_sha256(exported: Exported, tmp_path: Path) -> None:
    from afina.exporter.pipeline import ExportKeys, read_complete_manifest

    runtime, prefix = exported.runtime, exported.prefix
    keys = ExportKeys(prefix, ("f16", "q4_k_m", "q8_0"))
    assert read_complete_manifest(runtime.store, keys) is not None
    key = keys.gguf("q8_0")
    original = runtime.store.get_bytes(key)
    flipped = original[:-1] + bytes([original[-1] ^ 0xFF])  # same size, one byte changed
    runtime.store.put_bytes(key, flipped)
    try:
        assert read_complete_manifest(runtime.store, keys) is None  # a size check alone would have trusted it
    finally:
        runtime.store.put_bytes(key, original)
    assert read_complete_manifest(runtime.store, keys) is not None


def test_a_re_export_adds_a_variant_to_the_same_model(exported: Exported) -> None:
    from afina.core import ids
    from afina.core.artifacts import ExportManifest, ServedArtifacts
    from afina.core.db.models import Job

    runtime = exported.runtime
    [model] = models_of(runtime, exported.job_id)
    with runtime.db.session() as session:
        source = repo.get_job(session, TENANT, exported.job_id)
        export = Job(id=ids.job_id(), tenant_id=TENANT, model=source.model, training_file=source.training_file,
                     seed=1, hyperparameters={}, kind="export", stage="export", status="running",
                     method={"type": "export", "export": {"model": model.name, "source_job_id": source.id}},
                     export_options={"quantizations": ["q5_k_m"]})
        session.add(export)
    context = context_for(runtime, export, "export")
    assert export_job(context) is None
    manifest = ExportManifest.read(runtime.store, f"{exported.prefix}/manifest.json")
    assert manifest is not None and sorted(manifest.gguf) == ["f16", "q4_k_m", "q5_k_m", "q8_0"]
    assert manifest.serve == "q4_k_m"  # unchanged: the re-export did not ask for another
    assert set(manifest.timings) == {"merge", "quantize_q5_k_m", "verify"}  # only the new variant was made
    assert manifest.gguf["q5_k_m"].matches(runtime.store)
    [again] = models_of(runtime, exported.job_id)
    assert ServedArtifacts.of_row(again.artifacts, again.name).gguf["q5_k_m"].endswith("model-q5_k_m.gguf")
    row = job_row(runtime, export.id)
    assert row.status == "succeeded" and row.fine_tuned_model == model.name
    assert job_row(runtime, exported.job_id).status == "succeeded"  # the training job is untouched
    # its report's export section now lists the new variant, replaced in place
    page = runtime.store.get_bytes(f"{report_prefix(exported.job_id)}/report.md").decode()
    assert page.count("## Export and fidelity") == 1 and "| q5_k_m | model-q5_k_m.gguf |" in page
    assert list(result_files(runtime, exported.job_id)) == ["report.md", "verification.json"]
