"""What ingest made of a fine-tune file, callable without HTTP: status, counts, and the artifacts to download.

The ingest worker keeps the file row's ``ingest_state`` current (progress while it runs,
counts and an issue summary when it ends) and writes the report, stats and preview under
the file's dataset version in the store. The gateway only reads them: no ML dependency.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson

from afina.core.datasets.layout import INGEST_ARTIFACTS
from afina.core.db.models import File
from afina.core.errors import NotFound, ObjectMissing
from afina.core.runtime import Runtime
from afina.gateway.files.protocol import IngestArtifacts, IngestStatus
from afina.gateway.files.service import get_file

ARTIFACT_ROUTES = {"report": "ingest/report", "stats": "ingest/stats", "preview": "ingest/preview",
                   "token_lengths_png": "ingest/token_lengths.png"}


def ingest_status(runtime: Runtime, tenant_id: str, file_id: str) -> IngestStatus:
    row = get_file(runtime, tenant_id, file_id)
    state: dict[str, Any] = dict(row.ingest_state or {})
    stats = None
    if row.status == "processed" and row.dataset_key:
        stats = _read_json(runtime, row, "stats")
    base = f"/v1/files/{row.id}/"
    return IngestStatus(
        file_id=row.id, status=row.status, status_details=row.status_details, options=row.ingest_options,
        dataset_version=row.dataset_key, progress=state.get("progress"), counts=state.get("counts"),
        splits=state.get("splits"), issues=state.get("issues"), first_errors=state.get("first_errors"),
        stats=stats, artifacts=IngestArtifacts(**{name: base + path for name, path in ARTIFACT_ROUTES.items()}),
    )


def open_artifact(runtime: Runtime, tenant_id: str, file_id: str, name: str) -> tuple[File, str, Iterator[bytes]]:
    """(row, media type, bytes) of one ingest artifact; a 404 that says why when it is not there (yet)."""
    row = get_file(runtime, tenant_id, file_id)
    object_name, media_type = INGEST_ARTIFACTS[name]
    if not row.dataset_key:
        raise NotFound(f"file {file_id} has no ingest {object_name} yet (file status: {row.status})",
                       param="file_id", code="ingest_not_ready")
    chunks = runtime.store.iter_chunks(f"{row.dataset_key}/{object_name}")
    try:
        first = next(chunks, b"")
    except ObjectMissing:
        raise NotFound(f"file {file_id} has no ingest {object_name} (file status: {row.status})",
                       param="file_id", code="ingest_not_ready") from None
    return row, media_type, itertools.chain([first], chunks)


def _read_json(runtime: Runtime, row: File, name: str) -> dict[str, Any] | None:
    try:
        return orjson.loads(runtime.store.get_bytes(f"{row.dataset_key}/{INGEST_ARTIFACTS[name][0]}"))
    except (ObjectMissing, orjson.JSONDecodeError):
        return None
