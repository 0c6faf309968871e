"""HTTP routes of ``/v1/models`` (the logic is in ``service``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from afina.core.artifacts import ExportOptions
from afina.gateway.deps import RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import error_responses
from afina.gateway.fine_tuning import service as fine_tuning
from afina.gateway.fine_tuning.protocol import JobEvent, Page
from afina.gateway.models import exports, files, service
from afina.gateway.models.protocol import ModelDeleted, ModelExport, ModelFileList, ModelList, ModelObject
from afina.gateway.params import MODEL_NAME_PATH, refuse_nul_params

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(refuse_nul_params)])
Limit = Annotated[int, Query(ge=1, le=100)]
GGUF_MEDIA_TYPE = "application/octet-stream"
FINE_TUNE = [Depends(require("fine-tune"))]  # a model's files and exports; listing and reading need no scope

# the routes under a model come before the catch-all ``/{model}`` of any path, which would swallow them


@router.get("", responses=error_responses())
def list_models(runtime: RuntimeDep, tenant: TenantDep) -> ModelList:
    return service.list_models(runtime, tenant)


@router.get("/{model}/files", dependencies=FINE_TUNE, responses=error_responses(404, 503))
def list_model_files(model: str, runtime: RuntimeDep, tenant: TenantDep) -> ModelFileList:
    """Every exported file of a fine-tune (each GGUF variant, the Modelfile, the verification report)."""
    return files.list_files(runtime, tenant, model)


@router.get("/{model}/files/{filename}", dependencies=FINE_TUNE, responses=error_responses(404, 416, 503),
            response_class=StreamingResponse)
def download_model_file(model: str, filename: str, runtime: RuntimeDep, tenant: TenantDep,
                        range_header: Annotated[str | None, Header(alias="Range")] = None) -> StreamingResponse:
    """The file's bytes, streamed; ``Range: bytes=N-`` resumes a download (206 with ``Content-Range``)."""
    download = files.open_download(runtime, tenant, model, filename, range_header)
    headers = {"Content-Length": str(download.length), "Accept-Ranges": "bytes",
               "ETag": f'"{download.sha256}"', "Content-Disposition": f'attachment; filename="{download.filename}"'}
    if download.partial:
        end = download.start + download.length - 1
        headers["Content-Range"] = f"bytes {download.start}-{end}/{download.size}"
    return StreamingResponse(iterate_in_threadpool(download.chunks), status_code=206 if download.partial else 200,
                             media_type=GGUF_MEDIA_TYPE, headers=headers)


@router.post("/{model}/exports", dependencies=FINE_TUNE, responses=error_responses(400, 404))
def create_export(model: str, runtime: RuntimeDep, tenant: TenantDep,
                  body: ExportOptions | None = None) -> ModelExport:
    """Export the model again: other quantizations, Ollama registration, a Hub push (a tracked job); no body
    exports it again with the defaults (and retries the publications they call for)."""
    return exports.create_export(runtime, tenant, model, body or ExportOptions())


@router.get("/{model}/exports/{export_id}", dependencies=FINE_TUNE, responses=error_responses(404))
def retrieve_export(model: str, export_id: str, runtime: RuntimeDep, tenant: TenantDep) -> ModelExport:
    return exports.get_export(runtime, tenant, model, export_id)


@router.get("/{model}/exports/{export_id}/events", dependencies=FINE_TUNE, responses=error_responses(404))
def list_export_events(model: str, export_id: str, runtime: RuntimeDep, tenant: TenantDep,
                       after: str | None = None, limit: Limit = 20) -> Page[JobEvent]:
    job_id = exports.export_job_id(runtime, tenant, model, export_id)
    return fine_tuning.list_events(runtime, tenant, job_id, after, limit)


@router.delete("/{model}", dependencies=FINE_TUNE, responses=error_responses(404, 503))
def delete_model(model: str, runtime: RuntimeDep, tenant: TenantDep) -> ModelDeleted:
    """OpenAI's model deletion; a model afina registered in Ollama is removed there first."""
    return exports.delete_model(runtime, tenant, model)


@router.get(f"/{{model:{MODEL_NAME_PATH}}}", responses=error_responses(404))
def retrieve_model(model: str, runtime: RuntimeDep, tenant: TenantDep) -> ModelObject:
    """Any rest of the path: names such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` contain a slash."""
    return service.get_model(runtime, tenant, model)
