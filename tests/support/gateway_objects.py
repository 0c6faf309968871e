"""One of everything a tenant can name through the gateway, written straight into the registry and the store.

A processed training file with every ingest artifact, a result file, a succeeded job with
events and checkpoints, a registered fine-tune, a route to it and one exchange it kept: what the
tenant matrix asks another tenant for and what the API fuzzer reads back with real ids.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from afina.core import ids
from afina.core.batches import BATCH_KIND, BatchSpec, batch_id
from afina.core.catalog import resolve_base_model
from afina.core.datasets.layout import INGEST_ARTIFACTS, dataset_prefix, model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.evaluation_jobs import EVALUATION_KIND, EvaluationSpec
from afina.core.naming import checkpoint_model_name, fine_tuned_model_name
from afina.core.routing import RouteSpec, RouteTarget
from afina.core.runtime import Runtime
from tests.support.jobs import create_job, upload_file

SMOLLM2 = "smollm2-135m-instruct"
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
TRAINING_JSONL = b"".join(orjson.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}."}]}) + b"\n"
                          for i in range(12))


@dataclass
class TenantObjects:
    tenant: str
    training_file: str
    result_file: str
    job: str
    events: list[str]
    checkpoints: list[str]
    model: str  # the registered fine-tune's public name
    checkpoint_models: list[str] = field(default_factory=list)
    store_model: str = ""  # store:// URI of the fine-tune's merged weights folder
    export: str = ""  # a re-export job of the model (POST /v1/models/{model}/exports)
    export_event: str = ""  # that export's event
    route: str = ""  # a route (alias) whose one target is the fine-tune
    capture: str = ""  # an exchange of that route kept for retraining (its completion is chatcmpl-<capture>)
    evaluation: str = ""  # the fine-tuning job's evaluation (a job of kind "evaluation")
    batch: str = ""  # a finished /v1/batches batch (a job of kind "batch")


def _artifact_bytes(name: str) -> bytes:
    if name == "token_lengths_png":
        return PNG_1PX
    if name == "stats":
        return orjson.dumps({"examples": 12, "tokens": {"mean": 20}})
    if name == "report":
        return orjson.dumps({"file": "train.jsonl", "line": 1, "rule": "ok", "action": "kept"}) + b"\n"
    return b"<p>preview</p>" if name == "preview_html" else b"preview\n"


def seed_tenant_objects(runtime: Runtime, tenant: str, *, with_gguf: bool = False) -> TenantObjects:
    """``tenant``'s objects, as the workers would have left them after one finished job.

    ``with_gguf`` puts the catalog SmolLM2 GGUF in the store as the fine-tune's served artifact,
    so the tenant can really chat with it (a copy of ~100 MB: only where a test chats).
    """
    training = upload_file(runtime, tenant, TRAINING_JSONL)
    job = create_job(runtime, tenant, training.id, status="succeeded", stage="done", suffix="matrix")
    name = fine_tuned_model_name(SMOLLM2, tenant, "matrix", job.id)
    prefix = model_prefix(tenant, job.id)
    data_prefix = dataset_prefix(tenant, training.id, None)
    for artifact, (object_name, _media_type) in INGEST_ARTIFACTS.items():
        runtime.store.put_bytes(f"{data_prefix}/{object_name}", _artifact_bytes(artifact))
    result_info = runtime.store.put_bytes(f"{prefix}/results/metrics.csv", b"step,loss\n1,2.0\n2,1.5\n")
    gguf_key = f"{prefix}/model-q4_k_m.gguf"
    if with_gguf:
        runtime.store.put_file(gguf_key, Path(resolve_base_model(SMOLLM2).gguf_path()))
    else:
        runtime.store.put_bytes(gguf_key, b"GGUF placeholder of " + tenant.encode())
    runtime.store.put_bytes(f"{prefix}/merged/config.json", orjson.dumps({"model_type": "llama"}))
    _write_export_manifest(runtime, tenant, job.id, name, gguf_key)
    with runtime.db.session() as session:
        file_row = repo.get_file(session, tenant, training.id)
        file_row.status, file_row.dataset_key = "processed", data_prefix
        file_row.ingest_state = {"state": "done", "counts": {"train": 12}}
        result = repo.add_result_file(session, tenant, object_key=result_info.key, filename="metrics.csv",
                                      size=result_info.size, sha256=result_info.sha256 or "")
        session.flush()
        job_row = repo.get_job(session, tenant, job.id)
        job_row.fine_tuned_model, job_row.finished_at, job_row.result_files = name, job_row.created_at, [result.id]
        events = [repo.add_event(session, job.id, message).id
                  for message in ("Created fine-tuning job", "Step 1/2: loss=2.0", "Job succeeded")]
        checkpoints = [repo.add_checkpoint(session, job.id, step, f"{prefix}/checkpoints/step-{step}",
                                           {"train_loss": 2.0 / step}).id for step in (1, 2)]
        repo.register_model(session, name=name, tenant_id=tenant, base_model=SMOLLM2, job_id=job.id,
                            artifacts=served_artifacts(tenant, job.id, {"q4_k_m": gguf_key}))
        export = Job(id=ids.job_id(), tenant_id=tenant, model=SMOLLM2, training_file=training.id, seed=1,
                     hyperparameters={}, kind="export", stage="done", status="succeeded",
                     method={"type": "export", "export": {"model": name, "source_job_id": job.id}}, export_options={})
        session.add(export)
        session.flush()
        export_event = repo.add_event(session, export.id, f"Export of {name} queued").id
        evaluation = Job(id=ids.job_id(), tenant_id=tenant, model=SMOLLM2, training_file=training.id, seed=1,
                         hyperparameters={}, kind=EVALUATION_KIND, stage="done", status="succeeded",
                         method={EVALUATION_KIND: EvaluationSpec(model=name, source_job_id=job.id).model_dump()})
        session.add(evaluation)
        batch = Job(id=batch_id(), tenant_id=tenant, model="/v1/chat/completions", training_file=training.id, seed=0,
                    hyperparameters={}, kind=BATCH_KIND, stage="done", status="succeeded",
                    method=BatchSpec(endpoint="/v1/chat/completions", input_file_id=training.id).method())
        session.add(batch)
        route = f"alias-{secrets.token_hex(6)}"
        repo.put_route(session, tenant, route, RouteSpec(targets=[RouteTarget(model=name)]).to_row())
        capture = secrets.token_hex(12)
        repo.add_captured_exchange(session, exchange_id=capture, tenant_id=tenant, route=route, target=name,
                                   model=name, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                   answer="4.", finish_reason="stop")
    return TenantObjects(tenant=tenant, training_file=training.id, result_file=result.id, job=job.id, events=events,
                         checkpoints=checkpoints, model=name, export=export.id, export_event=export_event,
                         checkpoint_models=[checkpoint_model_name(name, step) for step in (1, 2)],
                         store_model=f"store://{prefix}/merged", route=route, capture=capture,
                         evaluation=evaluation.id, batch=batch.id)


def missing_like(value: str) -> str:
    """An id of the same shape that names nothing: every run of 8+ hex digits replaced by fresh ones."""
    import re

    return re.sub(r"[0-9a-f]{8,}", lambda match: secrets.token_hex(len(match.group()))[:len(match.group())], value)


def _write_export_manifest(runtime: Runtime, tenant: str, job_id: str, name: str, gguf_key: str) -> None:
    """The export manifest the exporter writes last, naming the files in the store."""
    from afina.core.artifacts import ExportManifest, FileEntry
    from afina.core.datasets.layout import adapter_prefix

    prefix = model_prefix(tenant, job_id)
    gguf = FileEntry(key=gguf_key, bytes=runtime.store.stat(gguf_key).size,
                     sha256=hashlib.sha256(b"".join(runtime.store.iter_chunks(gguf_key))).hexdigest())
    extra = {file: FileEntry.of(runtime.store.put_bytes(f"{prefix}/{file}", data))
             for file, data in (("Modelfile", f"FROM ./model-q4_k_m.gguf\n# {tenant}\n".encode()),
                                ("verification.json", b"{}"))}
    ExportManifest.build(name=name, job_id=job_id, tenant_id=tenant, base_model=SMOLLM2, family="chatml",
                         serve="q4_k_m", adapter=adapter_prefix(tenant, job_id), gguf={"f16": gguf, "q4_k_m": gguf},
                         modelfile=extra["Modelfile"], verification=extra["verification.json"],
                         created_at=1).write(runtime.store, f"{prefix}/manifest.json")


def served_artifacts(tenant_id: str, job_id: str, gguf: dict[str, str], serve: str = "q4_k_m") -> dict:
    """A registry row's ``artifacts`` as the exporter writes them (``ServedArtifacts``), for the given GGUF keys."""
    from afina.core.artifacts import ServedArtifacts
    from afina.core.datasets.layout import adapter_prefix

    prefix = model_prefix(tenant_id, job_id)
    return ServedArtifacts.build(gguf=gguf, serve=serve, modelfile=f"{prefix}/Modelfile",
                                 manifest=f"{prefix}/manifest.json",
                                 adapter=adapter_prefix(tenant_id, job_id)).model_dump(mode="json")
