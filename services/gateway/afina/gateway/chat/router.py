"""HTTP route of ``/v1/chat/completions`` (the logic is in ``service``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from afina.gateway.chat import service
from afina.gateway.chat.protocol import ChatCompletion, ChatCompletionRequest
from afina.gateway.deps import BackendDep, ModelFilesDep, RuntimeDep, TenantDep
from afina.gateway.error_protocol import error_responses, sse_event
from afina.gateway.params import refuse_nul_params

router = APIRouter(prefix="/v1/chat", tags=["chat"], dependencies=[Depends(refuse_nul_params)])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# one route, two bodies: the completion as JSON, or with ``stream=true`` its chunks as Server-Sent Events
COMPLETION = {200: {"model": ChatCompletion, "description": "The completion, or with `stream=true` its chunks as SSE.",
                    "content": {"text/event-stream": {"schema": sse_event(
                        "A chat.completion.chunk object as JSON, an error object if the model fails mid-stream, "
                        "or `[DONE]` at the end.")}}}}


@router.post("/completions", response_model=None, responses={**COMPLETION, **error_responses(404)})
async def create_chat_completion(body: ChatCompletionRequest, runtime: RuntimeDep, tenant: TenantDep,
                                 backend: BackendDep, model_files: ModelFilesDep) -> ChatCompletion | StreamingResponse:
    model = await service.resolve_model(runtime, model_files, tenant, body.model)
    if not body.stream:
        return await service.complete(backend, model, body)
    chunks = service.stream(backend, model, body)
    # the first chunk is awaited here, so a model that cannot load answers with an HTTP error status
    first = await anext(chunks, None)
    return StreamingResponse(service.sse(first, chunks), media_type="text/event-stream", headers=SSE_HEADERS)
