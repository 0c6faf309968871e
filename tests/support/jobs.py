"""Build jobs directly in the registry and store, to test one stage without the ones before it."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson

from afina.core import ids
from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, SplitFile
from afina.core.datasets.layout import dataset_prefix, raw_file_key
from afina.core.db import repository as repo
from afina.core.db.models import File, Job
from afina.core.queue.jobs import JobContext, new_owner
from afina.core.runtime import Runtime

SAMPLE_DATASET = Path(__file__).resolve().parents[2] / "cli" / "afina" / "cli" / "data" / "aeon_sample.jsonl"


def sample_examples(n: int | None = None) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in SAMPLE_DATASET.read_bytes().splitlines() if line.strip()]
    return lines[:n] if n else lines


def upload_file(runtime: Runtime, tenant_id: str, content: bytes, filename: str = "train.jsonl",
                ingest_options: dict[str, Any] | None = None) -> File:
    """A fine-tune file as the gateway registers it: stored, ``uploaded``, its ingest not run yet."""
    file_id = ids.file_id()
    key = raw_file_key(tenant_id, file_id, filename)
    info = runtime.store.put_bytes(key, content)
    with runtime.db.session() as session:
        repo.ensure_tenant(session, tenant_id)
        row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose="fine-tune", bytes=info.size,
                   sha256=info.sha256, object_key=key, status="uploaded", ingest_options=ingest_options)
        session.add(row)
    return row


def create_job(runtime: Runtime, tenant_id: str, training_file: str, *, model: str = "smollm2-135m-instruct",
               hyperparameters: dict[str, Any] | None = None, stage: str = "ingest",
               status: str = "validating_files", suffix: str | None = "test") -> Job:
    job = Job(id=ids.job_id(), tenant_id=tenant_id, model=model, training_file=training_file, suffix=suffix,
              seed=random.randint(0, 2**31 - 1), hyperparameters=hyperparameters or {}, method={"type": "supervised"},
              status=status, stage=stage)
    with runtime.db.session() as session:
        repo.ensure_tenant(session, tenant_id)
        session.add(job)
    return job


def write_prepared_dataset(runtime: Runtime, tenant_id: str, job_id: str, train: list[dict[str, Any]],
                           validation: list[dict[str, Any]] | None = None) -> str:
    """Store a dataset the way the ingest stage commits it (splits, then its ``DatasetManifest``), and point the
    job at it."""
    prefix = dataset_prefix(tenant_id, f"file-test-{job_id}", None)
    splits: dict[str, SplitFile] = {}
    for name, records in (("train", train), ("validation", validation or [])):
        if records:
            info = runtime.store.put_bytes(f"{prefix}/{name}.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in records))
            splits[name] = SplitFile(key=info.key, sha256=info.sha256 or "", bytes=info.size, examples=len(records))
    manifest = DatasetManifest.build(format="openai-chat", splits=splits, created_at=int(time.time()),
                                     counts={"train": len(train), "validation": len(validation or [])})
    manifest.write(runtime.store, f"{prefix}/{DATASET_MANIFEST}")
    with runtime.db.session() as session:
        job = repo.get_job(session, None, job_id)
        job.dataset_key = prefix
    return prefix


def context_for(runtime: Runtime, job: Job, stage: str) -> JobContext:
    """A JobContext holding the job's lease, as ``run_stage`` would hand it to stage code."""
    owner = new_owner()
    with runtime.db.session() as session:
        assert repo.acquire_lease(session, job.id, owner, runtime.settings.lease_s)
    return JobContext(runtime=runtime, job_id=job.id, tenant_id=job.tenant_id, stage=stage, owner=owner)
