"""HTTP route of ``/v1/completions`` (the logic is in ``service``)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from afina.gateway.chat.service import sse
from afina.gateway.completions import service
from afina.gateway.completions.protocol import Completion, CompletionRequest
from afina.gateway.deps import InferenceCallDep
from afina.gateway.error_protocol import error_responses, sse_event
from afina.gateway.serving.headers import SSE_HEADERS, target_headers

# NUL refusal, key, scope and rate limit: the route's one dependency (``deps.inference_call``)
router = APIRouter(prefix="/v1", tags=["completions"])

COMPLETION = {200: {"model": Completion, "description": "The completion, or with `stream=true` its chunks as SSE.",
                    "content": {"text/event-stream": {"schema": sse_event(
                        "A text_completion object as JSON, an error object if the model fails mid-stream, "
                        "or `[DONE]` at the end.")}}}}


@router.post("/completions", response_model=None, responses={**COMPLETION, **error_responses(404, 413, 429, 502, 504)})
async def create_completion(body: CompletionRequest, call: InferenceCallDep) -> Response:
    caller, dispatcher = call.caller, call.dispatcher
    plan = await dispatcher.plan(caller.tenant_id, body.model, call.end_user or body.user)
    if not body.stream:
        completion, answered = await service.complete(dispatcher, caller, plan, body)
        return Response(orjson.dumps(completion.model_dump(mode="json")), media_type="application/json",
                        headers=target_headers(answered))
    answered, chunks = await service.stream(dispatcher, caller, plan, body)
    return StreamingResponse(sse(chunks), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **target_headers(answered)})
