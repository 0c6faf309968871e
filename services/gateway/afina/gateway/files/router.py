"""HTTP routes of ``/v1/files`` (the logic is in ``service``)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from afina.gateway.deps import CallerDep, RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import BINARY, TEXT, content, error_responses
from afina.gateway.files import ingest, service
from afina.gateway.files.protocol import FileDeleted, FileList, FileObject, IngestStatus
from afina.gateway.files.upload import receive_upload
from afina.gateway.limits import streamed_upload

# a key with the inference or the fine-tune scope gets in; each purpose is checked against its scopes
# (service.scopes_for: batch files with either, training data with fine-tune), ingest's views need fine-tune
router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(require(*service.FILES_SCOPES))])
FINE_TUNE = [Depends(require("fine-tune"))]
OF_A_FILE = error_responses(404)  # the file is not this tenant's (or its ingest output is not there yet)

UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": ["fine-tune", "batch"]},
                   "ingest_options": {"type": "string", "description": "JSON of IngestOptions (send before file)"},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000,
                                              "description": "the file expires this long after its creation "
                                                             "(default: 30 days for purpose batch, never else)"}},
}}}}}


@router.post("", openapi_extra=UPLOAD_FORM, responses=error_responses(413))
@streamed_upload
async def upload_file(request: Request, runtime: RuntimeDep, caller: CallerDep) -> FileObject:
    """Streamed: the body is sniffed and size-limited while it arrives, never held in memory; ingest is queued.

    The key is checked (``caller``) before a byte of the body is read: the route takes no body parameter; a
    ``purpose`` its scopes do not cover is refused as soon as the field arrives.
    """
    settings = runtime.settings
    tenant = caller.tenant_id
    form = service.UploadForm(runtime, tenant, caller)  # options are checked against what the tenant may name
    upload = await receive_upload(request, file_field="file", max_bytes=settings.max_upload_bytes,
                                  spool_dir=settings.resolved_work_dir / "uploads", make_checker=form.checker,
                                  before_file=form.before_file, max_fields=settings.max_form_fields,
                                  max_field_bytes=settings.max_form_field_bytes)
    try:
        options = form.final_options(upload.fields)
        container = form.sniffer.container if form.sniffer is not None else None
        return await run_in_threadpool(service.store_upload, runtime, tenant, upload, options, container,
                                       caller=caller)
    finally:
        upload.discard()


@router.get("", responses=error_responses())
def list_files(runtime: RuntimeDep, caller: CallerDep, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Literal["asc", "desc"] = "desc") -> FileList:
    """The files the key may read (an inference-only key sees the batch files)."""
    return service.list_files(runtime, caller.tenant_id, purpose=purpose, after=after, limit=limit, order=order,
                              caller=caller)


@router.get("/{file_id}", responses=OF_A_FILE)
def retrieve_file(file_id: str, runtime: RuntimeDep, caller: CallerDep) -> FileObject:
    return FileObject.from_row(service.get_file(runtime, caller.tenant_id, file_id, caller=caller))


@router.delete("/{file_id}", responses=OF_A_FILE)
def delete_file(file_id: str, runtime: RuntimeDep, caller: CallerDep) -> FileDeleted:
    service.delete_file(runtime, caller.tenant_id, file_id, caller=caller)
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={**OF_A_FILE, **content({"application/octet-stream": BINARY}, "The file's bytes.")})
def file_content(file_id: str, runtime: RuntimeDep, caller: CallerDep) -> StreamingResponse:
    row, chunks = service.open_content(runtime, caller.tenant_id, file_id, caller=caller)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes),
                                      "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}"})


@router.get("/{file_id}/ingest", responses=OF_A_FILE, dependencies=FINE_TUNE)
def ingest_status(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> IngestStatus:
    """Status, progress, counts, stats and an issue summary of the file's ingest."""
    return ingest.ingest_status(runtime, tenant, file_id)


def _artifact(runtime: RuntimeDep, tenant: str, file_id: str, name: str, download: str | None) -> StreamingResponse:
    row, media_type, chunks = ingest.open_artifact(runtime, tenant, file_id, name)
    headers = {}
    if download:
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(f'{row.filename}.{download}')}"
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


@router.get("/{file_id}/ingest/report", response_class=StreamingResponse, dependencies=FINE_TUNE,
            responses={**OF_A_FILE, **content({"application/x-ndjson": TEXT}, "One JSON object a line.")})
def ingest_report(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    """Every issue, one JSON object a line: file, line, field, rule, action, detail."""
    return _artifact(runtime, tenant, file_id, "report", "report.jsonl")


@router.get("/{file_id}/ingest/stats", response_class=StreamingResponse, dependencies=FINE_TUNE,
            responses={**OF_A_FILE, **content({"application/json": {"type": "object"}}, "The dataset's statistics.")})
def ingest_stats(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    return _artifact(runtime, tenant, file_id, "stats", None)


@router.get("/{file_id}/ingest/preview", response_class=StreamingResponse, dependencies=FINE_TUNE,
            responses={**OF_A_FILE, **content({"text/plain": TEXT, "text/html": TEXT}, "The rendered examples.")})
def ingest_preview(file_id: str, runtime: RuntimeDep, tenant: TenantDep,
                   format: Literal["txt", "html"] = "txt") -> StreamingResponse:  # noqa: A002 - the query name
    """The first examples rendered with the model's chat template, trained tokens marked."""
    return _artifact(runtime, tenant, file_id, "preview_html" if format == "html" else "preview", None)


@router.get("/{file_id}/ingest/token_lengths.png", response_class=StreamingResponse, dependencies=FINE_TUNE,
            responses={**OF_A_FILE, **content({"image/png": BINARY}, "A histogram of token lengths.")})
def ingest_token_lengths(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    return _artifact(runtime, tenant, file_id, "token_lengths_png", None)
