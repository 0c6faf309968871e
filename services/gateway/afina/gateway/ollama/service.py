"""Ollama's native API over afina: chat, generate and embed through the same plans, backends and queues as
``/v1``; tags, show and ps from the registry; delete through the models service.

What Ollama would do with a feature afina does not serve (images, tools, thinking, a Go template
override, ``suffix``, the deprecated ``context``) is refused with a 400 that names the field, never
silently dropped into a different answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from anyio import to_thread

from afina.core.artifacts import ManifestInvalid, ServedArtifacts
from afina.core.catalog import CATALOG, catalog_model
from afina.core.catalog.family import ChatFamily
from afina.core.catalog.gguf_metadata import gguf_metadata
from afina.core.db import repository as repo
from afina.core.errors import InvalidRequest, NotFound
from afina.core.keys import KeyGrant
from afina.core.routing import RouteSpec
from afina.core.runtime import Runtime
from afina.gateway.inference.base import Generation, GenerationRequest, OutputFormat, Sampling, ServedModel, TextDelta
from afina.gateway.ollama.protocol import (
    ChatRequest,
    Details,
    Format,
    GenerateRequest,
    ListedModel,
    Options,
    RunningModel,
    keep_alive_seconds,
)
from afina.gateway.serving.defaults import with_route_options, with_route_system
from afina.gateway.serving.dispatch import Answered, Dispatcher
from afina.gateway.serving.resolve import Plan

# general.file_type (llama.cpp's llama_ftype) -> Ollama's quantization_level
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


# --- generation -----------------------------------------------------------------------------------------

def output_format(value: Format) -> OutputFormat | None:
    if value in (None, ""):
        return None
    if value == "json":
        return OutputFormat("json", param="format")
    assert isinstance(value, dict)
    return OutputFormat("json_schema", value, param="format")


def sampling(options: Options | None) -> Sampling:
    options = options or Options()
    return Sampling(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k, min_p=options.min_p,
                    max_tokens=options.num_predict, stop=tuple(options.stop or ()), seed=options.seed,
                    repeat_penalty=options.repeat_penalty, presence_penalty=options.presence_penalty,
                    frequency_penalty=options.frequency_penalty)


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if value:
            raise InvalidRequest(f"'{name}' is not supported by afina's models", param=name)


def _checked_num_ctx(options: Options | None, model: ServedModel) -> int | None:
    num_ctx = options.num_ctx if options else None
    if num_ctx is not None and model.context_length is not None and num_ctx > model.context_length:
        raise InvalidRequest(f"num_ctx {num_ctx} is larger than the model's context length {model.context_length}",
                             param="options.num_ctx")
    return num_ctx


def chat_request(body: ChatRequest, plan: Plan, model: ServedModel) -> GenerationRequest:
    _refuse_unsupported({"tools": body.tools, "think": body.think,
                         "images": any(message.images for message in body.messages),
                         "tool_calls": any(message.tool_calls for message in body.messages)})
    messages = with_route_system(plan, [{"role": m.role, "content": m.content} for m in body.messages])
    return GenerationRequest(model=model, messages=messages,
                             sampling=with_route_options(plan, sampling(body.options)),
                             output_format=output_format(body.format), num_ctx=_checked_num_ctx(body.options, model),
                             keep_alive_s=keep_alive_seconds(body.keep_alive))


def generate_request(body: GenerateRequest, plan: Plan, model: ServedModel) -> GenerationRequest:
    """A raw prompt is continued as is; otherwise the prompt is one user turn of a chat (with ``system``, or
    the route's), formatted by the model's own chat template, as Ollama does with its template."""
    _refuse_unsupported({"template": body.template, "suffix": body.suffix, "images": body.images,
                         "context": body.context, "think": body.think})
    common: dict[str, Any] = {"model": model, "sampling": with_route_options(plan, sampling(body.options)),
                              "output_format": output_format(body.format),
                              "num_ctx": _checked_num_ctx(body.options, model),
                              "keep_alive_s": keep_alive_seconds(body.keep_alive)}
    if body.raw:
        return GenerationRequest(prompt=body.prompt, **common)
    system = [{"role": "system", "content": body.system}] if body.system else []
    return GenerationRequest(messages=with_route_system(plan, [*system, {"role": "user", "content": body.prompt}]),
                             **common)


def _stats(generation: Generation, started_ns: int, finished_ns: int) -> dict[str, Any]:
    return {"done_reason": generation.finish_reason, "total_duration": max(0, finished_ns - started_ns),
            "load_duration": generation.load_ns, "prompt_eval_count": generation.prompt_tokens,
            "prompt_eval_duration": generation.prompt_eval_ns, "eval_count": generation.completion_tokens,
            "eval_duration": generation.eval_ns}


def chat_body(name: str, text: str) -> dict[str, Any]:
    return {"model": name, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": text}}


def generate_body(name: str, text: str) -> dict[str, Any]:
    return {"model": name, "created_at": now_rfc3339(), "response": text}


async def answer(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan, build: Any, shape: Any,
                 started_ns: int, clock: Any) -> tuple[dict[str, Any], Answered]:
    """The whole answer as one object (``stream: false``)."""
    generation, answered = await dispatcher.generate(caller, plan, build)
    return {**shape(plan.requested, generation.text), "done": True, **_stats(generation, started_ns, clock())}, \
        answered


async def stream(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan, build: Any, shape: Any,
                 started_ns: int, clock: Any) -> tuple[Answered, AsyncIterator[dict[str, Any]]]:
    """NDJSON objects: one per piece with ``done: false``, then the statistics with ``done: true``."""
    first = await dispatcher.stream(caller, plan, build)

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for piece in first.pieces:
            if isinstance(piece, TextDelta):
                yield {**shape(plan.requested, piece.text), "done": False}
            else:
                yield {**shape(plan.requested, ""), "done": True, **_stats(piece, started_ns, clock())}

    return first.answered, lines()


# --- models: tags, show, ps ------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _file_facts(path: Path, mtime_ns: int) -> tuple[str, dict[str, Any]]:
    """(sha256, GGUF metadata without its large arrays) of a served file, once per file version."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), gguf_metadata(path)


def _details(metadata: dict[str, Any]) -> Details:
    family = str(metadata.get("general.architecture", ""))
    count = metadata.get("general.parameter_count")
    return Details(family=family, families=[family] if family else None,
                   parameter_size=_human_count(count) if isinstance(count, int) else "",
                   quantization_level=FILE_TYPES.get(metadata.get("general.file_type", -1), ""))


def _human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


def _listed(name: str, path: Path, modified: float) -> ListedModel:
    stat = path.stat()
    digest, metadata = _file_facts(path, stat.st_mtime_ns)
    return ListedModel(name=name, model=name, modified_at=_rfc3339(modified), size=stat.st_size, digest=digest,
                       details=_details(metadata))


def _manifest_facts(runtime: Runtime, row: Any) -> ListedModel:
    """A fine-tune as listed: its served variant's size and sha256 from the export manifest (no download);
    a model whose manifest is unreadable shows the served file's size from the store, and no digest."""
    from afina.core.artifacts import ExportManifest

    served = ServedArtifacts.of_row(row.artifacts, row.name)
    manifest = ExportManifest.read(runtime.store, served.manifest)
    entry = manifest.gguf.get(served.serve) if manifest is not None else None
    if entry is not None:
        size, digest = entry.bytes, entry.sha256
    else:
        size, digest = runtime.store.stat(served.served_key).size, ""
    family = manifest.family if manifest is not None else ""
    return ListedModel(name=row.name, model=row.name, modified_at=_rfc3339(row.created_at), size=size,
                       digest=digest, details=Details(family=family, families=[family] if family else None,
                                                      quantization_level=served.serve.upper()))


def list_tags(runtime: Runtime, tenant_id: str) -> list[ListedModel]:
    """Catalog base models installed here, the tenant's fine-tunes, and its routes (named for their first
    target's details)."""
    listed: list[ListedModel] = []
    for spec in CATALOG.values():
        try:
            path = spec.gguf_path()
        except NotFound:
            continue
        listed.append(_listed(spec.id, path, path.stat().st_mtime))
    with runtime.db.session() as session:
        rows = repo.list_models(session, tenant_id)
        routes = [(route.name, route.updated_at, route.spec) for route in repo.list_routes(session, tenant_id)]
    for row in rows:
        try:
            listed.append(_manifest_facts(runtime, row))
        except (ManifestInvalid, NotFound):
            continue  # a model whose export is gone is not servable: not listed
    for name, updated_at, spec in routes:
        digest = hashlib.sha256(repr(sorted(spec.items())).encode()).hexdigest()
        first = RouteSpec.from_row(spec).targets[0]
        parent = next((item for item in listed if item.name == first.model and not first.upstream), None)
        details = parent.details.model_copy(update={"parent_model": first.label}) if parent else \
            Details(parent_model=first.label)
        listed.append(ListedModel(name=name, model=name, modified_at=_rfc3339(updated_at), size=0, digest=digest,
                                  details=details))
    return listed


def _family_of(runtime: Runtime, tenant_id: str, name: str) -> ChatFamily | None:
    spec = catalog_model(name)
    if spec is None:
        with runtime.db.session() as session:
            row = repo.get_model(session, tenant_id, name)
            base = row.base_model if row is not None else None
        spec = catalog_model(base) if base else None
    return spec.family if spec is not None else None


def show(runtime: Runtime, tenant_id: str, name: str, served: ServedModel, verbose: bool) -> dict[str, Any]:
    """Ollama's ``/api/show`` for the model a name resolves to: its template and stop parameters (what an
    Ollama registration carries), details and GGUF metadata."""
    family = _family_of(runtime, tenant_id, served.name)
    template = family.ollama_template if family else ""
    stops = list(family.stop) if family else []
    parameters = "\n".join(f'stop{" " * 27}"{stop}"' for stop in stops)
    modelfile = "\n".join([f"# Modelfile of {name} in afina", f"FROM {served.name}",
                           *([f'TEMPLATE """{template}"""'] if template else []),
                           *[f'PARAMETER stop "{stop}"' for stop in stops]]) + "\n"
    metadata: dict[str, Any] = {}
    modified = datetime.now(UTC).timestamp()
    if served.path is not None:
        stat = served.path.stat()
        metadata = dict(_file_facts(served.path, stat.st_mtime_ns)[1])
        modified = stat.st_mtime
    if not verbose:
        metadata = {key: ([] if isinstance(value, list) else value) for key, value in metadata.items()}
    return {"modelfile": modelfile, "parameters": parameters, "template": template, "details":
            _details(metadata).model_dump(), "model_info": metadata, "capabilities": ["completion"],
            "modified_at": _rfc3339(modified)}


def public_names(runtime: Runtime, tenant_id: str, loaded: list[str]) -> dict[str, str]:
    """The tenant's name for each loaded model it may call: a catalog model or fine-tune as is, a model an Ollama
    backend holds under its Ollama name as the fine-tune registered there. Others' models are left out."""
    names = {name: name for name in loaded if catalog_model(name) is not None}
    with runtime.db.session() as session:
        for row in repo.list_models(session, tenant_id):
            registered = (row.ollama or {}).get("name") if (row.ollama or {}).get("status") == "registered" else None
            for name in loaded:
                if name == row.name or (registered and name == registered):
                    names[name] = row.name
    return names


async def running(dispatcher: Dispatcher) -> list[RunningModel]:
    """Models a backend holds now, with when they will be let go."""
    models = []
    for backend in dispatcher.backends.all():
        for loaded in await backend.loaded():
            digest, metadata = ("", {})
            if loaded.model.path is not None and loaded.model.path.exists():
                stat = loaded.model.path.stat()
                digest, metadata = await to_thread.run_sync(_file_facts, loaded.model.path, stat.st_mtime_ns)
            expires = _rfc3339(loaded.expires_at) if loaded.expires_at else "0001-01-01T00:00:00Z"
            models.append(RunningModel(name=loaded.model.name, model=loaded.model.name, size=loaded.size,
                                       digest=digest, details=_details(metadata), expires_at=expires))
    return models
