"""HTTP routes of ``/v1/files`` (the logic is in ``service``)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from afina.core.datasets.jsonl import JsonlSniffer
from afina.gateway.deps import RuntimeDep, TenantDep
from afina.gateway.files import service
from afina.gateway.files.protocol import FileDeleted, FileList, FileObject
from afina.gateway.files.upload import receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": ["fine-tune"]}},
}}}}}


@router.post("", openapi_extra=UPLOAD_FORM)
async def upload_file(request: Request, runtime: RuntimeDep, tenant: TenantDep) -> FileObject:
    """Streamed: the body is checked as JSONL and size-limited while it arrives, never held in memory."""
    settings = runtime.settings
    upload = await receive_upload(request, file_field="file", max_bytes=settings.max_upload_bytes,
                                  spool_dir=settings.resolved_work_dir / "uploads", make_checker=JsonlSniffer,
                                  before_file=lambda fields: service.check_purpose(fields, required=False))
    try:
        return await run_in_threadpool(service.store_upload, runtime, tenant, upload)
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
