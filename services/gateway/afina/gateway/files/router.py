"""HTTP routes of ``/v1/files`` (the logic is in ``service``)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from afina.gateway.deps import RuntimeDep, TenantDep
from afina.gateway.files import ingest, service
from afina.gateway.files.protocol import FileDeleted, FileList, FileObject, IngestStatus
from afina.gateway.files.upload import receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": ["fine-tune"]},
                   "ingest_options": {"type": "string", "description": "JSON of IngestOptions (send before file)"}},
}}}}}


@router.post("", openapi_extra=UPLOAD_FORM)
async def upload_file(request: Request, runtime: RuntimeDep, tenant: TenantDep) -> FileObject:
    """Streamed: the body is sniffed and size-limited while it arrives, never held in memory; ingest is queued."""
    settings = runtime.settings
    form = service.UploadForm()
    upload = await receive_upload(request, file_field="file", max_bytes=settings.max_upload_bytes,
                                  spool_dir=settings.resolved_work_dir / "uploads", make_checker=form.checker,
                                  before_file=form.before_file)
    try:
        options = form.final_options(upload.fields)
        container = form.sniffer.container if form.sniffer is not None else None
        return await run_in_threadpool(service.store_upload, runtime, tenant, upload, options, container)
    finally:
        upload.discard()


@router.get("")
def list_files(runtime: RuntimeDep, tenant: TenantDep, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Literal["asc", "desc"] = "desc") -> FileList:
    return service.list_files(runtime, tenant, purpose=purpose, after=after, limit=limit, order=order)


@router.get("/{file_id}")
def retrieve_file(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FileObject:
    return FileObject.from_row(service.get_file(runtime, tenant, file_id))


@router.delete("/{file_id}")
def delete_file(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FileDeleted:
    service.delete_file(runtime, tenant, file_id)
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=StreamingResponse)
def file_content(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    row, chunks = service.open_content(runtime, tenant, file_id)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes),
                                      "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}"})


@router.get("/{file_id}/ingest")
def ingest_status(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> IngestStatus:
    """Status, progress, counts, stats and an issue summary of the file's ingest."""
    return ingest.ingest_status(runtime, tenant, file_id)


def _artifact(runtime: RuntimeDep, tenant: str, file_id: str, name: str, download: str | None) -> StreamingResponse:
    row, media_type, chunks = ingest.open_artifact(runtime, tenant, file_id, name)
    headers = {}
    if download:
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(f'{row.filename}.{download}')}"
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


@router.get("/{file_id}/ingest/report", response_class=StreamingResponse)
def ingest_report(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    """Every issue, one JSON object a line: file, line, field, rule, action, detail."""
    return _artifact(runtime, tenant, file_id, "report", "report.jsonl")


@router.get("/{file_id}/ingest/stats", response_class=StreamingResponse)
def ingest_stats(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    return _artifact(runtime, tenant, file_id, "stats", None)


@router.get("/{file_id}/ingest/preview", response_class=StreamingResponse)
def ingest_preview(file_id: str, runtime: RuntimeDep, tenant: TenantDep,
                   format: Literal["txt", "html"] = "txt") -> StreamingResponse:  # noqa: A002 - the query name
    """The first examples rendered with the model's chat template, trained tokens marked."""
    return _artifact(runtime, tenant, file_id, "preview_html" if format == "html" else "preview", None)


@router.get("/{file_id}/ingest/token_lengths.png", response_class=StreamingResponse)
def ingest_token_lengths(file_id: str, runtime: RuntimeDep, tenant: TenantDep) -> StreamingResponse:
    return _artifact(runtime, tenant, file_id, "token_lengths_png", None)
