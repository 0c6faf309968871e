"""A contract Ollama: the endpoints of Ollama's ``docs/api.md`` that afina's registration uses, with Ollama's shapes
and its refusals, served over real HTTP (uvicorn on loopback, in a thread of the test process).

No Ollama binary runs on these machines, so the exporter's registration is tested against this server. It follows
Ollama's server (``server/routes.go``, ``server/create.go``) where it matters to a client:

- ``HEAD /api/blobs/sha256:<hex>``: 200 or 404 ``blob "…" not found``; 400 ``invalid digest format``.
- ``POST /api/blobs/sha256:<hex>``: the raw bytes, hashed as they arrive into a temporary file that becomes the blob
  only when its sha256 is the digest (201); ``digest mismatch, expected "…", got "…"`` (400) otherwise; 200 without
  reading the body when the blob exists. A client that dies mid-upload leaves nothing behind.
- ``POST /api/create``: validated as Ollama does before streaming (a body without ``from`` or ``files``, such as
  the legacy ``{"modelfile": …}``, is 400 ``neither 'from' or 'files' was specified``; a bad name is 400
  ``invalid model name``), then NDJSON progress lines ending in ``{"status":"success"}``; an unknown blob, a file
  that is not GGUF or a template that does not parse fails *in* the stream (HTTP 200, a last ``{"error": …}``
  line), as in Ollama, or as one JSON error with ``"stream": false``.
- ``POST /api/show``, ``GET /api/tags``, ``DELETE /api/delete`` (404 ``model '…' not found``), ``GET /api/version``,
  ``GET /`` (``Ollama is running``).
- ``POST /api/chat``: generates for real with llama.cpp (``llama_cpp.Llama`` on the registered blob, with the
  registered LoRA adapter blob as ``lora_path``), the prompt rendered from the Go ``template`` given at create
  (``tests.support.gotemplate``), the model's ``system`` added when the chat has none, the model's parameters
  under the request's ``options``, ``stop`` and ``num_ctx`` honoured (older turns dropped to fit, as Ollama's
  ``chatPrompt`` does), NDJSON chunks or one object.

What afina does not use is refused with 501 rather than imitated (``from``, ``quantize``, tools, ``format``).
Faults for tests: ``go_down()``/``come_back()`` (connection refused, then the same port and models again),
``fail_create(message, http_status=None)``, ``stall_create(seconds)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.gotemplate import ollama_prompt
from tests.support.servers import free_port, port_open, wait_until

CONTRACT_VERSION = "0.0.0-afina-contract"
DEFAULT_NUM_CTX = 4096  # Ollama's default context length
# Ollama's DefaultOptions (api/types.go) for the options the contract server passes to llama.cpp
DEFAULT_OPTIONS: dict[str, Any] = {"num_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                                   "repeat_penalty": 1.0, "seed": -1}
UNSUPPORTED_CREATE_FIELDS = ("from", "quantize", "quantization", "draft", "renderer", "parser", "remote_host",
                             "messages")
_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_DEFAULT_HOST, _DEFAULT_NAMESPACE, _DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
LLAMA_THREADS = 2
MAX_LOADED = 2


# --- Ollama's model names (types/model/name.go) ---------------------------------------------------------------

@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """Ollama matches names case-insensitively (``getExistingName``)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    def shortest(self) -> str:
        """``DisplayShortest``: the host and namespace only when they are not the defaults."""
        if self.host.lower() != _DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != _DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def _valid_part(kind: str, value: str) -> bool:
    if not 1 <= len(value) <= (350 if kind == "host" else 80):
        return False
    if not (value[0].isascii() and (value[0].isalnum() or value[0] == "_")):
        return False
    for char in value[1:]:
        if char in "_-":
            continue
        if char == ".":
            if kind == "namespace":
                return False
            continue
        if char == ":":
            if kind != "host":
                return False
            continue
        if not (char.isascii() and char.isalnum()):
            return False
    return True


def parse_ollama_name(text: str) -> OllamaName | None:
    """``ParseName`` merged with the defaults; None when the name is not valid (``IsValid``)."""
    tag = ""
    if text.rfind(":") > text.rfind("/"):
        text, tag = text.rsplit(":", 1)
    parts = text.split("/")
    if len(parts) > 3:
        return None
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else _DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else _DEFAULT_HOST
    if "://" in host:
        host = host.split("://", 1)[1]
    name = OllamaName(host=host, namespace=namespace, model=model, tag=tag or _DEFAULT_TAG)
    valid = all(_valid_part(kind, value) for kind, value in
                (("host", name.host), ("namespace", name.namespace), ("model", name.model), ("tag", name.tag)))
    return name if valid else None


# --- Go's formatting, for the texts Ollama writes --------------------------------------------------------------

def go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` (what ``%q`` and ``%#v`` print for a string)."""
    escapes = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t", "\v": r"\v",
               "\\": r"\\", '"': r"\""}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def go_value(value: Any) -> str:
    """``%#v`` of a JSON value as Ollama decoded it (numbers are float64: 2048 prints 2048, 0.7 prints 0.7)."""
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        number = float(value)
        return str(int(number)) if number.is_integer() and abs(number) < 1e21 else repr(number)
    return json.dumps(value)


def go_plain(value: Any) -> str:
    """``%v`` of a JSON value (the Modelfile's ``PARAMETER`` argument)."""
    if isinstance(value, str):
        return value
    return go_value(value)


def modelfile_quote(text: str) -> str:
    """The Modelfile writer's ``quote`` (parser/parser.go)."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- what the server holds ---------------------------------------------------------------------------------------

@dataclass
class StoredModel:
    name: OllamaName
    model_digest: str
    adapter_digest: str | None
    template: str | None
    system: str | None
    parameters: dict[str, Any]
    licenses: list[str]
    details: dict[str, Any]
    model_info: dict[str, Any]
    size: int
    manifest_digest: str
    modified_at: float = field(default_factory=time.time)

    def digests(self) -> set[str]:
        return {self.model_digest} | ({self.adapter_digest} if self.adapter_digest else set())


@dataclass
class _Loaded:
    llm: Any
    lock: threading.Lock


def _gguf_summary(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ollama's ``details`` of a GGUF and its non-verbose ``model_info`` (the scalar metadata)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    info: dict[str, Any] = {}
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or not value.types or value.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        info[key] = value.contents()
    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    info["general.parameter_count"] = parameters
    file_type = info.get("general.file_type")
    try:
        level = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        level = str(file_type)
    architecture = str(info.get("general.architecture", ""))
    details = {"parent_model": "", "format": "gguf", "family": architecture, "families": [architecture],
               "parameter_size": _human_number(parameters), "quantization_level": level}
    return details, info


def _human_number(count: int) -> str:
    """Ollama's ``format.HumanNumber`` (134515008 -> 134.52M)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            text = f"{value:.0f}" if value >= 100 and value.is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return str(count)


class OllamaState:
    """Blobs on disk and models in memory: kept while the HTTP side goes down and comes back."""

    def __init__(self, root: Path) -> None:
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, StoredModel] = {}
        self.lock = threading.Lock()
        self.blob_uploads: list[str] = []  # digests of the uploads that became blobs, in order
        self.create_requests: list[dict[str, Any]] = []  # every /api/create body, as received
        self.create_failure: tuple[str, int | None] | None = None
        self.create_stall_s = 0.0
        self._loaded: dict[tuple[str, str | None, int], _Loaded] = {}
        self._summaries: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def gguf_summary(self, digest: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``_gguf_summary`` of a blob, read once (a blob never changes: it is named by its content)."""
        if digest not in self._summaries:
            self._summaries[digest] = _gguf_summary(self.blob_path(digest))
        return self._summaries[digest]

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest.replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def find(self, text: str) -> StoredModel | None:
        name = parse_ollama_name(text)
        return None if name is None else self.models.get(name.key)

    def remove_unused_blobs(self, removed: StoredModel) -> None:
        """Ollama's ``RemoveLayers``: a deleted model's blobs go unless another model uses them."""
        in_use = set().union(*(model.digests() for model in self.models.values()))
        for digest in removed.digests() - in_use:
            self.blob_path(digest).unlink(missing_ok=True)
        self.unload(lambda key: key[0] not in in_use or (key[1] is not None and key[1] not in in_use))

    def llama(self, model: StoredModel, num_ctx: int) -> _Loaded:
        from llama_cpp import Llama

        key = (model.model_digest, model.adapter_digest, num_ctx)
        with self.lock:
            loaded = self._loaded.pop(key, None)
            if loaded is None:
                adapter = str(self.blob_path(model.adapter_digest)) if model.adapter_digest else None
                llm = Llama(model_path=str(self.blob_path(model.model_digest)), lora_path=adapter, n_ctx=num_ctx,
                            n_threads=LLAMA_THREADS, n_threads_batch=LLAMA_THREADS, verbose=False)
                loaded = _Loaded(llm=llm, lock=threading.Lock())
            self._loaded[key] = loaded  # most recently used last
            while len(self._loaded) > MAX_LOADED:
                evicted = self._loaded.pop(next(iter(self._loaded)))
                with evicted.lock:
                    evicted.llm.close()
            return loaded

    def unload(self, which: Any = None) -> None:
        with self.lock:
            for key in [key for key in self._loaded if which is None or which(key)]:
                loaded = self._loaded.pop(key)
                with loaded.lock:
                    loaded.llm.close()


# --- the HTTP side ---------------------------------------------------------------------------------------------

def _error(message: str, status: int) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Any) -> dict[str, Any] | Any:
    """The body as Go's ``ShouldBindJSON`` sees it: ``missing request body`` when empty, 400 when not JSON."""
    raw = await request.body()
    if not raw.strip():
        return _error("missing request body", 400)
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        return _error(f"invalid character in JSON: {exc.msg}", 400)
    if not isinstance(body, dict):
        return _error("json: cannot unmarshal into Go value of type api.Request", 400)
    return body


def _type_error(body: dict[str, Any], checks: dict[str, type | tuple[type, ...]]) -> Any:
    for key, expected in checks.items():
        if key in body and body[key] is not None and not isinstance(body[key], expected):
            return _error(f"json: cannot unmarshal {type(body[key]).__name__} into Go struct field .{key}", 400)
    return None


def _valid_file_path(path: str) -> bool:
    """Go's ``fs.ValidPath``: relative, slash-separated, no empty, ``.`` or ``..`` element."""
    return path == "." or (bool(path) and all(part not in ("", ".", "..") for part in path.split("/")))


def build_app(state: OllamaState) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return JSONResponse({"version": CONTRACT_VERSION})

    async def head_blob(request: Request) -> Response:
        digest = request.path_params["digest"]
        if not _DIGEST.fullmatch(digest):
            return _error("invalid digest format", 400)
        if not state.has_blob(digest):
            return _error(f"blob {go_quote(digest)} not found", 404)
        return Response(status_code=200)

    async def post_blob(request: Request) -> Response:
        digest = request.path_params["digest"]
        if not _DIGEST.fullmatch(digest):
            return _error("invalid digest format", 400)
        if state.has_blob(digest):
            return Response(status_code=200)
        partial = state.blob_dir / f".partial-{uuid.uuid4().hex}"
        hasher = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                async for chunk in request.stream():
                    hasher.update(chunk)
                    out.write(chunk)
        except ClientDisconnect:
            partial.unlink(missing_ok=True)
            return Response(status_code=400)
        got = f"sha256:{hasher.hexdigest()}"
        if got != digest.replace("-", ":", 1).lower():
            partial.unlink(missing_ok=True)
            return _error(f"digest mismatch, expected {go_quote(digest)}, got {go_quote(got)}", 400)
        os.replace(partial, state.blob_path(digest))
        state.blob_uploads.append(digest)
        return Response(status_code=201)

    async def create(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        state.create_requests.append(body)
        refused = _type_error(body, {"model": str, "name": str, "files": dict, "adapters": dict, "template": str,
                                     "system": str, "parameters": dict, "license": (str, list), "stream": bool})
        if refused is not None:
            return refused
        for file_name, digest in (body.get("files") or {}).items():
            if not _valid_file_path(file_name):
                return _error("file path must be relative", 400)
            if not digest:
                return _error("invalid digest format", 400)
        for digest in (body.get("adapters") or {}).values():
            if not digest:
                return _error("invalid digest format", 400)
        name = parse_ollama_name(body.get("model") or body.get("name") or "")
        if name is None:
            return _error("invalid model name", 400)
        unsupported = [key for key in UNSUPPORTED_CREATE_FIELDS if body.get(key)]
        if unsupported:
            return _error(f"the contract Ollama does not implement {unsupported} (afina does not send them)", 501)
        if body.get("files") is None:
            return _error("neither 'from' or 'files' was specified", 400)
        if state.create_failure is not None and state.create_failure[1] is not None:
            return _error(*state.create_failure)  # type: ignore[arg-type]
        lines = _create_lines(state, name, body)
        if body.get("stream") is False:
            latest: dict[str, Any] = {}
            async for line in lines:
                if "error" in line:
                    return _error(line["error"], line.get("_status", 500))
                latest = line
            return JSONResponse(latest)
        first = await anext(lines)
        if "error" in first:  # nothing written yet: Ollama sets the status and sends one JSON error
            return _error(first["error"], first.get("_status", 500))

        async def ndjson() -> AsyncIterator[bytes]:
            yield (json.dumps(first) + "\n").encode()
            async for line in lines:
                line.pop("_status", None)
                yield (json.dumps(line) + "\n").encode()
                if "error" in line:
                    return

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    async def show(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        requested = body.get("model") or body.get("name")
        if not requested:
            return _error("model is required", 400)
        if parse_ollama_name(requested) is None:
            return _error(f"name {go_quote(requested)} is invalid", 400)
        model = state.find(requested)
        if model is None:
            return _error(f"model '{requested}' not found", 404)
        return JSONResponse(_show_response(state, model))

    async def tags(request: Request) -> Response:
        return JSONResponse({"models": [
            {"name": model.name.shortest(), "model": model.name.shortest(), "modified_at": _rfc3339(model.modified_at),
             "size": model.size, "digest": model.manifest_digest, "details": model.details}
            for model in sorted(state.models.values(), key=lambda item: -item.modified_at)]})

    async def delete(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        requested = body.get("model") or body.get("name") or ""
        if parse_ollama_name(requested) is None:
            return _error(f"name {go_quote(requested)} is invalid", 400)
        with state.lock:
            model = state.find(requested)
            if model is None:
                return _error(f"model '{requested}' not found", 404)
            del state.models[model.name.key]
        state.remove_unused_blobs(model)
        return Response(status_code=200)

    async def chat(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        refused = _type_error(body, {"model": str, "messages": list, "options": dict, "stream": bool})
        if refused is not None:
            return refused
        if not body.get("model"):
            return _error("model is required", 400)
        if parse_ollama_name(body["model"]) is None:
            return _error(f"name {go_quote(body['model'])} is invalid", 400)
        if body.get("tools") or body.get("format") or body.get("think"):
            return _error("the contract Ollama does not implement tools, format or think", 501)
        model = state.find(body["model"])
        if model is None:
            return _error(f"model '{body['model']}' not found", 404)
        messages = [{"role": str(message.get("role", "")), "content": str(message.get("content") or "")}
                    for message in body.get("messages") or []]
        if not messages:
            return JSONResponse({"model": body["model"], "created_at": _rfc3339(time.time()),
                                 "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        if model.template is None:
            return _error("the contract Ollama renders only a template given at create", 500)
        options = {**DEFAULT_OPTIONS, **model.parameters, **(body.get("options") or {})}
        turn = _ChatTurn(state, model, body["model"], messages, options, keep_alive=body.get("keep_alive"))
        try:
            await asyncio.to_thread(turn.prepare)
        except _ChatError as exc:
            return _error(str(exc), exc.status)
        if body.get("stream") is False:
            return JSONResponse(await asyncio.to_thread(turn.whole))
        return StreamingResponse(turn.chunks(), media_type="application/x-ndjson")

    async def not_found(request: Request) -> Response:
        return PlainTextResponse("404 page not found", status_code=404)

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/blobs/{digest}", head_blob, methods=["HEAD"]),
        Route("/api/blobs/{digest}", post_blob, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/chat", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found})


async def _create_lines(state: OllamaState, name: OllamaName, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The create's progress lines; an ``{"error"}`` line ends them (``_status``: the HTTP status if it is first)."""
    files: dict[str, str] = body["files"]
    adapters: dict[str, str] = body.get("adapters") or {}
    if state.create_stall_s:
        await asyncio.sleep(state.create_stall_s)
    if not files or not all(file_name.endswith(".gguf") for file_name in files):
        # Ollama sniffs a file without the .gguf suffix; afina always names it, so anything else is refused
        yield {"error": "unknown type", "_status": 400}
        return
    yield {"status": "parsing GGUF"}
    if state.create_failure is not None:
        yield {"error": state.create_failure[0]}
        return
    if len(files) > 1:
        yield {"error": "the contract Ollama takes one GGUF file (split GGUFs are not implemented)", "_status": 501}
        return
    if len(adapters) > 1:
        yield {"error": "only one adapter is currently supported", "_status": 400}
        return
    summaries = {}
    for digest in [*files.values(), *adapters.values()]:
        if not _DIGEST.fullmatch(digest):
            yield {"error": "invalid digest format"}
            return
        path = state.blob_path(digest)
        if not path.is_file():
            yield {"error": f"open {path}: no such file or directory"}
            return
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                yield {"error": "supplied file was not in GGUF format", "_status": 400}
                return
        try:
            summaries[digest] = await asyncio.to_thread(state.gguf_summary, digest)
        except (ValueError, IndexError, KeyError) as exc:  # ggml.Decode's refusal, as Ollama streams it
            yield {"error": f"invalid file magic or version: {exc}"}
            return
        yield {"status": f"using existing layer {digest}"}
    (model_digest,) = files.values()
    adapter_digest = next(iter(adapters.values()), None)
    template = body.get("template") or None
    if template is not None:
        try:
            ollama_prompt(template, [{"role": "user", "content": "x"}])
        except ValueError as exc:  # what Go's template.Parse refuses (the interpreter raises for what it lacks)
            yield {"error": f"template error: {exc}", "_status": 400}
            return
        except (KeyError, NameError):  # a field this sample chat lacks: Go's missingkey=zero renders it empty
            pass
    system = body.get("system") or None
    license_value = body.get("license")
    licenses = [license_value] if isinstance(license_value, str) else [str(item) for item in license_value or []]
    licenses = [text for text in licenses if text]
    parameters = dict(body.get("parameters") or {})
    layers: list[tuple[str, int]] = [(model_digest, state.blob_path(model_digest).stat().st_size)]
    if adapter_digest:
        layers.append((adapter_digest, state.blob_path(adapter_digest).stat().st_size))
    for text in [template, system, *licenses, json.dumps(parameters, sort_keys=True) if parameters else None]:
        if text:
            digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
            layers.append((digest, len(text.encode())))
            yield {"status": f"creating new layer {digest}"}
    yield {"status": "writing manifest"}
    manifest = json.dumps({"layers": layers}, sort_keys=True).encode()
    details, info = summaries[model_digest]
    stored = StoredModel(name=name, model_digest=model_digest, adapter_digest=adapter_digest, template=template,
                         system=system, parameters=parameters, licenses=licenses, details=details, model_info=info,
                         size=sum(size for _, size in layers), manifest_digest=hashlib.sha256(manifest).hexdigest())
    with state.lock:
        replaced = state.models.get(name.key)
        state.models[name.key] = stored
    if replaced is not None:
        state.remove_unused_blobs(replaced)
    yield {"status": "success"}


def _show_response(state: OllamaState, model: StoredModel) -> dict[str, Any]:
    params: list[str] = []
    commands = [f"FROM {state.blob_path(model.model_digest)}"]
    if model.adapter_digest:
        commands.append(f"ADAPTER {modelfile_quote(str(state.blob_path(model.adapter_digest)))}")
    if model.template is not None:
        commands.append(f"TEMPLATE {modelfile_quote(model.template)}")
    if model.system:
        commands.append(f"SYSTEM {modelfile_quote(model.system)}")
    for key, value in model.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            params.append(f"{key:<30} {go_value(item)}")
            commands.append(f"PARAMETER {key} {modelfile_quote(go_plain(item))}")
    commands += [f"LICENSE {modelfile_quote(text)}" for text in model.licenses]
    modelfile = ('# Modelfile generated by "ollama show"\n'
                 "# To build a new Modelfile based on this, replace FROM with:\n"
                 f"# FROM {model.name.shortest()}\n\n" + "".join(line + "\n" for line in commands))
    response: dict[str, Any] = {"modelfile": modelfile, "parameters": "\n".join(params),
                                "template": model.template or "", "details": model.details,
                                "model_info": model.model_info, "capabilities": ["completion"],
                                "modified_at": _rfc3339(model.modified_at)}
    if model.system:
        response["system"] = model.system
    if model.licenses:
        response["license"] = "\n".join(model.licenses)
    return response


class _ChatError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _ChatTurn:
    """One /api/chat: the prompt Ollama would build, then llama.cpp's tokens as Ollama's chunks."""

    def __init__(self, state: OllamaState, model: StoredModel, requested: str, messages: list[dict[str, str]],
                 options: dict[str, Any], keep_alive: Any) -> None:
        self.state, self.model, self.requested, self.options = state, model, requested, options
        if messages[0]["role"] != "system" and model.system:
            messages = [{"role": "system", "content": model.system}, *messages]
        self.messages = messages
        self.keep_alive = keep_alive
        self.num_ctx = int(options.get("num_ctx") or DEFAULT_NUM_CTX)
        self.started = time.monotonic_ns()

    def prepare(self) -> None:
        try:
            self.loaded = self.state.llama(self.model, self.num_ctx)
        except Exception as exc:  # noqa: BLE001 - llama.cpp refusing the blob is the answer
            raise _ChatError(f"llama runner process has terminated: {exc}", 500) from exc
        self.loaded_at = time.monotonic_ns()
        llm = self.loaded.llm
        # Ollama's chatPrompt: drop the oldest turns (keeping system messages) until the prompt fits num_ctx
        for start in range(len(self.messages)):
            kept = [message for message in self.messages[:start] if message["role"] == "system"]
            try:
                prompt = ollama_prompt(self.model.template or "", kept + self.messages[start:])
            except (ValueError, KeyError, NameError) as exc:
                raise _ChatError(f"template: {exc}", 500) from exc
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            if len(tokens) <= self.num_ctx:
                break
        if len(tokens) >= self.num_ctx:
            raise _ChatError("the input length exceeds the context length", 400)
        self.prompt_tokens = tokens

    def _stream(self) -> Iterator[dict[str, Any]]:
        stop = self.options.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [str(item) for item in stop]
        seed = int(self.options.get("seed", -1))
        num_predict = int(self.options.get("num_predict", -1))
        text: list[str] = []
        finish = "stop"
        with self.loaded.lock:
            prompt_done = time.monotonic_ns()
            # the whole prompt evaluated afresh: reusing the previous chat's cache shifts the logits enough to
            # change a greedy answer, and a test compares answers
            self.loaded.llm.reset()
            pieces = self.loaded.llm.create_completion(
                prompt=self.prompt_tokens, max_tokens=num_predict if num_predict > 0 else None,
                temperature=float(self.options.get("temperature", 0.8)), top_k=int(self.options.get("top_k", 40)),
                top_p=float(self.options.get("top_p", 0.9)), min_p=float(self.options.get("min_p", 0.0)),
                repeat_penalty=float(self.options.get("repeat_penalty", 1.0)), seed=seed if seed >= 0 else None,
                stop=stop, stream=True)
            for piece in pieces:
                choice = piece["choices"][0]
                if choice["text"]:
                    text.append(choice["text"])
                    yield {"model": self.requested, "created_at": _rfc3339(time.time()),
                           "message": {"role": "assistant", "content": choice["text"]}, "done": False}
                finish = choice.get("finish_reason") or finish
            eval_count = len(self.loaded.llm.tokenize("".join(text).encode("utf-8"), add_bos=False, special=True))
        if self.keep_alive in (0, "0", "0s"):
            self.state.unload(lambda key: key == (self.model.model_digest, self.model.adapter_digest, self.num_ctx))
        now = time.monotonic_ns()
        yield {"model": self.requested, "created_at": _rfc3339(time.time()),
               "message": {"role": "assistant", "content": ""}, "done": True,
               "done_reason": "length" if finish == "length" else "stop",
               "total_duration": now - self.started, "load_duration": self.loaded_at - self.started,
               "prompt_eval_count": len(self.prompt_tokens), "prompt_eval_duration": prompt_done - self.loaded_at,
               "eval_count": eval_count, "eval_duration": now - prompt_done}

    def chunks(self) -> Iterator[bytes]:
        for chunk in self._stream():
            yield (json.dumps(chunk) + "\n").encode()

    def whole(self) -> dict[str, Any]:
        chunks = list(self._stream())
        final = chunks[-1]
        final["message"]["content"] = "".join(chunk["message"]["content"] for chunk in chunks[:-1])
        return final


# --- running it ------------------------------------------------------------------------------------------------

class ContractOllama:
    """The contract server on a loopback port; its state survives ``go_down()``/``come_back()``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.state = OllamaState(root)
        self.port = port or free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ContractOllama:
        import uvicorn

        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"contract-ollama-{self.port}", daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started or not self._thread.is_alive(), timeout, "contract Ollama")
        if not self._server.started:
            raise RuntimeError(f"the contract Ollama could not listen on port {self.port} (see the log above)")
        return self

    def go_down(self, timeout: float = 30) -> None:
        """Stop listening: a client now gets connection refused on the same URL."""
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout)
            self._server = None
        wait_until(lambda: not port_open("127.0.0.1", self.port), timeout, "contract Ollama to stop listening")

    def come_back(self) -> None:
        """Listen again on the same port, with the blobs and models it had (an Ollama restarted)."""
        self.start()

    def stop(self) -> None:
        self.go_down()
        self.state.unload()

    def fail_create(self, message: str, *, http_status: int | None = None) -> None:
        """Make every create fail with ``message``: in the stream after ``parsing GGUF`` (as a disk-full or
        conversion error does in Ollama), or, with ``http_status``, as that status before any output."""
        self.state.create_failure = (message, http_status)

    def stop_failing(self) -> None:
        self.state.create_failure = None
        self.state.create_stall_s = 0.0

    def stall_create(self, seconds: float) -> None:
        """Say nothing for ``seconds`` before the first create line (a client's read timeout fires)."""
        self.state.create_stall_s = seconds

    def model_names(self) -> list[str]:
        return sorted(model.name.shortest() for model in self.state.models.values())


@pytest.fixture
def contract_ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContractOllama]:
    """A fresh contract Ollama (no blobs, no models) for one test; other conftests import this fixture."""
    server = ContractOllama(tmp_path_factory.mktemp("contract-ollama")).start()
    try:
        yield server
    finally:
        server.stop()
