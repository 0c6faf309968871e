"""HTTP route of ``/v1/chat/completions`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from afina.gateway.chat import service
from afina.gateway.chat.protocol import ChatCompletion, ChatCompletionRequest
from afina.gateway.deps import BackendDep, ModelFilesDep, RuntimeDep, TenantDep

router = APIRouter(prefix="/v1/chat", tags=["chat"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, runtime: RuntimeDep, tenant: TenantDep,
                                 backend: BackendDep, model_files: ModelFilesDep) -> ChatCompletion | StreamingResponse:
    model = await service.resolve_model(runtime, model_files, tenant, body.model)
    if not body.stream:
        return await service.complete(backend, model, body)
    chunks = service.stream(backend, model, body)
    # the first chunk is awaited here, so a model that cannot load answers with an HTTP error status
    first = await anext(chunks, None)
    return StreamingResponse(service.sse(first, chunks), media_type="text/event-stream", headers=SSE_HEADERS)
