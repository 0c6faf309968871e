"""HTTP routes of Ollama's native API, ``/api/*`` (the logic is in ``service``).

The official ``ollama`` client drives these unchanged, with afina's key in its headers
(``ollama.Client(host=..., headers={"Authorization": "Bearer afk-..."})``). Errors answer in
Ollama's shape, ``{"error": "..."}`` (``afina.gateway.errors`` maps them by path).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from anyio import to_thread
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from afina.core.errors import AfinaError
from afina.core.keys import KeyGrant
from afina.gateway.chat.service import mid_stream_error
from afina.gateway.deps import DispatcherDep, InferenceCallDep, RuntimeDep, TenantDep, require
from afina.gateway.inference.base import UpstreamError
from afina.gateway.models import exports
from afina.gateway.ollama import service
from afina.gateway.ollama.protocol import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
    keep_alive_seconds,
)
from afina.gateway.params import refuse_nul_params
from afina.gateway.serving.headers import target_headers

# every route refuses a NUL in its parameters: those that generate or embed through their one dependency
# (``deps.inference_call``: NUL, key, scope, the key's rate limits), the others through ``CHECKED``
router = APIRouter(prefix="/api", tags=["ollama"])
CHECKED = [Depends(refuse_nul_params)]
INFERENCE = [*CHECKED, Depends(require("inference"))]
root_router = APIRouter(tags=["ollama"])
NDJSON = "application/x-ndjson"
# the Ollama API version whose docs/api.md these routes follow
OLLAMA_API_VERSION = "0.11.0"


@root_router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def ollama_is_running() -> PlainTextResponse:
    """What clients probe to find an Ollama (``GET /``), no key needed."""
    return PlainTextResponse("Ollama is running")


@router.get("/version", dependencies=CHECKED)
def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


async def _ndjson(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for line in lines:
            yield orjson.dumps(line) + b"\n"
    except (AfinaError, UpstreamError) as exc:
        yield orjson.dumps({"error": mid_stream_error(exc).message}) + b"\n"
    finally:
        await lines.aclose()  # type: ignore[attr-defined]


async def _respond(dispatcher: DispatcherDep, caller: KeyGrant, plan: Any, build: Any, shape: Any,
                   stream: bool) -> JSONResponse | StreamingResponse:
    started = time.perf_counter_ns()
    if not stream:
        body, answered = await service.answer(dispatcher, caller, plan, build, shape, started, time.perf_counter_ns)
        return JSONResponse(body, headers=target_headers(answered))
    answered, lines = await service.stream(dispatcher, caller, plan, build, shape, started, time.perf_counter_ns)
    return StreamingResponse(_ndjson(lines), media_type=NDJSON, headers=target_headers(answered))


async def _load_or_unload(dispatcher: DispatcherDep, tenant: str, plan: Any, keep_alive: Any,
                          shape: dict[str, Any]) -> JSONResponse:
    """An empty prompt or chat loads the model (``done_reason: load``); with ``keep_alive: 0`` it unloads it."""
    served = await dispatcher.resolver.served(tenant, plan.candidates[0])
    reason = "load"
    if keep_alive_seconds(keep_alive) == 0:
        await dispatcher.backends.get(served.backend).unload(served)
        reason = "unload"
    return JSONResponse({"model": plan.requested, "created_at": service.now_rfc3339(), **shape, "done": True,
                         "done_reason": reason})


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, call: InferenceCallDep) -> JSONResponse | StreamingResponse:
    caller, dispatcher = call.caller, call.dispatcher
    plan = await dispatcher.plan(caller.tenant_id, body.model, call.end_user)
    if not body.messages:
        return await _load_or_unload(dispatcher, caller.tenant_id, plan, body.keep_alive,
                                     {"message": {"role": "assistant", "content": ""}})
    return await _respond(dispatcher, caller, plan, lambda model: service.chat_request(body, plan, model),
                          service.chat_body, body.stream)


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, call: InferenceCallDep) -> JSONResponse | StreamingResponse:
    caller, dispatcher = call.caller, call.dispatcher
    plan = await dispatcher.plan(caller.tenant_id, body.model, call.end_user)
    if not body.prompt and not body.system:
        return await _load_or_unload(dispatcher, caller.tenant_id, plan, body.keep_alive, {"response": ""})
    return await _respond(dispatcher, caller, plan, lambda model: service.generate_request(body, plan, model),
                          service.generate_body, body.stream)


@router.post("/embed")
async def embed(body: EmbedRequest, call: InferenceCallDep) -> JSONResponse:
    started = time.perf_counter_ns()
    caller, dispatcher = call.caller, call.dispatcher
    plan = await dispatcher.plan(caller.tenant_id, body.model)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    embeddings, answered = await dispatcher.embed(caller, plan, inputs, truncate=body.truncate,
                                                  keep_alive_s=keep_alive_seconds(body.keep_alive))
    return JSONResponse({"model": plan.requested, "embeddings": embeddings.vectors,
                         "total_duration": time.perf_counter_ns() - started, "load_duration": embeddings.load_ns,
                         "prompt_eval_count": embeddings.prompt_tokens}, headers=target_headers(answered))


@router.post("/embeddings")
async def embeddings(body: EmbeddingsRequest, call: InferenceCallDep) -> JSONResponse:
    """The legacy single-prompt form of ``/api/embed``."""
    plan = await call.dispatcher.plan(call.caller.tenant_id, body.model)
    result, answered = await call.dispatcher.embed(call.caller, plan, [body.prompt],
                                              keep_alive_s=keep_alive_seconds(body.keep_alive))
    return JSONResponse({"embedding": result.vectors[0]}, headers=target_headers(answered))


@router.get("/tags", dependencies=INFERENCE)
def tags(runtime: RuntimeDep, tenant: TenantDep) -> dict[str, Any]:
    return {"models": [model.model_dump() for model in service.list_tags(runtime, tenant)]}


@router.post("/show", dependencies=INFERENCE)
async def show(body: ModelRequest, runtime: RuntimeDep, tenant: TenantDep, dispatcher: DispatcherDep) -> dict[str, Any]:
    plan = await dispatcher.plan(tenant, body.target)
    served = await dispatcher.resolver.served(tenant, plan.candidates[0])
    return await to_thread.run_sync(service.show, runtime, tenant, plan.requested, served, body.verbose)


@router.get("/ps", dependencies=INFERENCE)
async def ps(runtime: RuntimeDep, tenant: TenantDep, dispatcher: DispatcherDep) -> dict[str, Any]:
    """Only what this tenant may call, by the names it calls them: a model of another tenant is not shown."""
    running = await service.running(dispatcher)
    names = await to_thread.run_sync(service.public_names, runtime, tenant, [model.name for model in running])
    return {"models": [model.model_copy(update={"name": names[model.name], "model": names[model.name]}).model_dump()
                       for model in running if names.get(model.name)]}


@router.delete("/delete", dependencies=[*CHECKED, Depends(require("fine-tune"))])
def delete(body: ModelRequest, runtime: RuntimeDep, tenant: TenantDep) -> JSONResponse:
    """A fine-tune of this tenant, as ``DELETE /v1/models/{model}`` does (Ollama's registration first)."""
    exports.delete_model(runtime, tenant, body.target)
    return JSONResponse(None, status_code=200)
