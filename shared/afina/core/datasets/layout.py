"""Where datasets, jobs and models live in the object store.

Every key starts with the tenant, so a listing can never cross tenants.
"""

from __future__ import annotations

import hashlib


def raw_file_key(tenant_id: str, file_id: str, filename: str) -> str:
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in filename)[-128:] or "upload"
    return f"files/{tenant_id}/{file_id}/{safe_name}"


def dataset_prefix(tenant_id: str, training_file: str, validation_file: str | None) -> str:
    """A processed dataset is addressed by its inputs, so preparing it twice finds the first result."""
    source = hashlib.sha256(f"{training_file}|{validation_file or ''}".encode()).hexdigest()[:16]
    return f"datasets/{tenant_id}/{source}"


def dataset_version_prefix(tenant_id: str, version_id: str) -> str:
    """One processed version of one upload: its key derives from the raw bytes, the options and the tokenizer."""
    return f"datasets/{tenant_id}/{version_id}"


# what an ingest run writes under its version prefix; its DatasetManifest (afina.core.artifacts) last
INGEST_ARTIFACTS: dict[str, tuple[str, str]] = {  # name -> (object name, media type)
    "report": ("report.jsonl", "application/x-ndjson"),
    "stats": ("stats.json", "application/json"),
    "preview": ("preview.txt", "text/plain; charset=utf-8"),
    "preview_html": ("preview.html", "text/html; charset=utf-8"),
    "token_lengths_png": ("token_lengths.png", "image/png"),
}


def job_prefix(tenant_id: str, job_id: str) -> str:
    """A job's own objects (checkpoints, adapter, report): under its tenant, like every other key."""
    return f"jobs/{tenant_id}/{job_id}"


def checkpoint_prefix(tenant_id: str, job_id: str, step: int) -> str:
    return f"{job_prefix(tenant_id, job_id)}/checkpoints/step-{step:07d}"


def adapter_prefix(tenant_id: str, job_id: str) -> str:
    return f"{job_prefix(tenant_id, job_id)}/adapter"


def model_prefix(tenant_id: str, job_id: str) -> str:
    return f"models/{tenant_id}/{job_id}"
