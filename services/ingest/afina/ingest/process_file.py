"""Ingest one uploaded fine-tune file as soon as it arrives, keeping its row's status and progress current.

The file row tells the user everything (OpenAI's file object: ``uploaded`` → ``processed`` or
``error`` with ``status_details``; afina's ``ingest_state``: progress, counts, issue summary).
The work itself is ``pipeline.ingest_file``; a job created before this finishes runs the
same pipeline and finds or makes the same content-addressed version.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from afina.core.datasets.options import IngestOptions
from afina.core.db import repository as repo
from afina.core.db.models import File
from afina.core.errors import AfinaError, NotFound
from afina.core.logging import log_event
from afina.core.runtime import Runtime
from afina.ingest.crypto import check_key_env
from afina.ingest.pipeline import IngestFailed, IngestProgress, IngestResult, IngestSource, ingest_file, version_key

log = logging.getLogger("afina.ingest")
PROGRESS_MIN_INTERVAL_S = 1.0


def source_of(row: File) -> IngestSource:
    return IngestSource(tenant_id=row.tenant_id, raw_key=row.object_key, filename=row.filename, sha256=row.sha256)


def run_ingest(runtime: Runtime, source: IngestSource, options: IngestOptions,
               progress: Callable[[IngestProgress], None]) -> IngestResult:
    """``pipeline.ingest_file`` with this runtime's store, folders, key and worker settings: the one way both
    the upload's own ingest and a job's ingest stage run it, so both make the same version."""
    settings = runtime.settings
    check_key_env(options, settings.key_envs_for(source.tenant_id))  # again on the worker, before any work
    return ingest_file(runtime.store, source, options, work_dir=settings.resolved_work_dir / "ingest",
                       model_cache_dir=settings.resolved_model_cache_dir, data_key=settings.data_encryption_key,
                       progress=progress, progress_every=settings.ingest_progress_every,
                       processes=settings.ingest_processes)


def options_of(row: File) -> IngestOptions:
    return IngestOptions.model_validate(row.ingest_options or {})


def _set_state(runtime: Runtime, file_id: str, **values: Any) -> None:
    with runtime.db.session() as session:
        row = repo.get_file(session, None, file_id, for_update=True)
        state = dict(row.ingest_state or {})
        state.update(values.pop("state", {}))
        row.ingest_state = state
        for name, value in values.items():
            setattr(row, name, value)


def record_result(runtime: Runtime, file_id: str, result: IngestResult) -> None:
    """The file is ``processed``: its version, counts and issue summary on its row."""
    summary = result.summary
    _set_state(runtime, file_id, status="processed", status_details=None, dataset_key=result.version_key,
               state={"state": "done", "version": result.version_key, "counts": summary.get("counts"),
                      "splits": summary.get("splits"), "issues": summary.get("issues"), "first_errors": [],
                      "finished_at": int(time.time())})


def record_failure(runtime: Runtime, file_id: str, failure: AfinaError, version: str | None) -> None:
    """The file is ``error``: ``status_details`` says why (file, line, field, rule of the first errors)."""
    summary = failure.summary if isinstance(failure, IngestFailed) else {}
    _set_state(runtime, file_id, status="error", status_details=failure.message, dataset_key=version,
               state={"state": "failed", "version": version,
                      "error": {"code": failure.code, "message": failure.message},
                      "counts": summary.get("counts"), "splits": summary.get("splits"),
                      "issues": summary.get("issues"), "first_errors": summary.get("first_errors"),
                      "finished_at": int(time.time())})


def process_uploaded_file(runtime: Runtime, file_id: str) -> str:
    """Ingest ``file_id`` if it still waits for it; returns what happened (``processed``, ``error``, ``skipped``)."""
    try:
        with runtime.db.session() as session:
            row = repo.get_file(session, None, file_id)
            if row.status != "uploaded" or row.purpose != "fine-tune":
                return "skipped"
            source, options = source_of(row), options_of(row)
    except NotFound:
        return "skipped"  # deleted before its ingest ran
    version = version_key(source, options, runtime.store)
    _set_state(runtime, file_id, dataset_key=version,
               state={"state": "running", "version": version, "started_at": int(time.time()),
                      "progress": {"rows": 0, "examples": 0, "issues": 0, "stage": "reading"}})
    last = [0.0]

    def on_progress(event: IngestProgress) -> None:
        now = time.monotonic()
        if event.stage == "reading" and now - last[0] < PROGRESS_MIN_INTERVAL_S:
            return
        last[0] = now
        _set_state(runtime, file_id, state={"progress": event.as_dict()})

    try:
        result = run_ingest(runtime, source, options, on_progress)
    except AfinaError as exc:
        record_failure(runtime, file_id, exc, getattr(exc, "version_key", version))
        log_event(log, "file.ingest_failed", file_id=file_id, code=exc.code)
        return "error"
    except Exception as exc:  # a fault of ours: the file says so without internals; the log has the trace
        log_event(log, "file.ingest_crashed", logging.ERROR, file_id=file_id, trace=traceback.format_exc())
        failure = AfinaError(f"ingest failed unexpectedly ({type(exc).__name__}); creating a job with this file "
                             "retries it", code="ingest_internal_error")
        record_failure(runtime, file_id, failure, version)
        return "error"
    if result.reused:
        on_progress(IngestProgress(rows=result.summary.get("counts", {}).get("rows", 0),
                                   examples=result.summary.get("counts", {}).get("examples", 0),
                                   issues=result.summary.get("issue_total", 0), stage="done", elapsed_s=0.0))
    record_result(runtime, file_id, result)
    log_event(log, "file.ingested", file_id=file_id, version=result.version_key, reused=result.reused,
              processes=result.processes)
    return "processed"
