"""A contract Ollama: the endpoints of Ollama's ``docs/api.md`` that afina uses (the exporter's registration, the
gateway's Ollama backend), with Ollama's shapes and its refusals, served over real HTTP (uvicorn on loopback, in a
thread of the test process).

No Ollama binary runs on these machines, so both are tested against this server. It follows Ollama's server
(``server/routes.go``, ``server/create.go``, ``api/types.go``) where it matters to a client:

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
- ``POST /api/chat`` and ``POST /api/generate``: generate for real with llama.cpp (``llama_cpp.Llama`` on the
  registered blob, with the registered LoRA adapter blob as ``lora_path``). A chat's prompt is rendered from the Go
  ``template`` given at create (``tests.support.gotemplate``), the model's ``system`` added when the chat has none,
  older turns dropped to fit ``num_ctx`` as Ollama's ``chatPrompt`` does; ``/api/generate`` renders its ``prompt``
  (and ``system``) the same way, or with ``raw: true`` sends the prompt as is (``raw mode does not support
  template, system, or context`` with a system, 400). The model's parameters lie under the request's ``options``
  (checked as ``Options.FromMap`` does: ``option "top_k" must be of type integer`` is a 500, as in Ollama);
  ``num_predict``, ``stop``, ``seed``, the samplers and ``num_ctx`` are honoured; ``format`` (``"json"`` or a JSON
  schema) constrains the output with a llama.cpp grammar. NDJSON chunks, or one object with ``stream: false``; the
  last has ``done_reason`` (``stop``/``length``), the counts and the durations (ns). A client that goes away stops
  the generation (``OllamaState.generations`` counts the tokens sampled per request, so a test can see it did).
  With no messages / an empty prompt the model is only loaded (``done_reason: "load"``), or with ``keep_alive: 0``
  unloaded (``done_reason: "unload"``).
- ``keep_alive`` (a number of seconds, or a Go duration such as ``"5m"``; negative: forever; default ``5m``) on
  every call sets when the model is unloaded (lazily, at the next request); ``0`` unloads it after the call.
- ``POST /api/embed``: ``input`` (a string or a list of strings), ``truncate`` (``false``: 400 ``the input length
  exceeds the context length``), unit-norm mean-pooled vectors from an embedding context of the same blob; an
  unknown model is 404 ``model "…" not found, try pulling it first``.
- ``GET /api/ps``: the models loaded now, with ``size``, ``size_vram`` (0: CPU), ``expires_at`` and
  ``context_length``.

What afina does not use is refused with 501 rather than imitated (``from``, ``quantize``, tools, ``think``, images,
``suffix``, a per-request ``template``, ``context``, embedding ``dimensions``; the legacy ``/api/embeddings`` is
not served). Faults for tests: ``go_down()``/``come_back()`` (connection refused, then the same port and models
again), ``fail_create(message, http_status=None)``, ``stall_create(seconds)``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import to_thread

from tests.support.gotemplate import ollama_prompt
from tests.support.servers import free_port, port_open, wait_until

CONTRACT_VERSION = "0.0.0-afina-contract"
DEFAULT_NUM_CTX = 4096  # Ollama's default context length
# Ollama's DefaultOptions (api/types.go) for the options the contract server passes to llama.cpp
DEFAULT_OPTIONS: dict[str, Any] = {"num_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                                   "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                                   "seed": -1}
# the Go type of every option Ollama's Options.FromMap sets, as its errors name it; an unknown option is ignored
OPTION_TYPES: dict[str, str] = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
                     "main_gpu", "num_thread", "draft_num_predict"), "integer"),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"), "float32"),
    "use_mmap": "boolean", "stop": "array"}
DEFAULT_KEEP_ALIVE_S = 300.0  # OLLAMA_KEEP_ALIVE's default, 5m
FOREVER_S = (2**63 - 1) / 1e9  # a negative keep_alive: time.Duration(math.MaxInt64)
_GO_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
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


@dataclass(frozen=True)
class _LoadKey:
    """What one llama.cpp context is: blobs, a context length, generation or embeddings (Ollama reloads a runner
    for another ``num_ctx``; llama.cpp embeds only with a context made for it)."""

    model_digest: str
    adapter_digest: str | None
    num_ctx: int
    embedding: bool = False


@dataclass
class _Loaded:
    llm: Any
    lock: threading.Lock
    model: StoredModel  # the model of the request that loaded or last used it: what /api/ps names
    size: int  # bytes of its blobs
    expires_at: float  # epoch seconds; the next request after it unloads it


@dataclass
class GenerationTally:
    """One /api/chat or /api/generate: the tokens llama.cpp sampled so far; ``completed`` once it reached its end
    (end of turn, a stop string, num_predict), ``stopped`` once it generates no more (completed, or its client went
    away)."""

    tokens: int = 0
    completed: bool = False
    stopped: bool = False


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
        self.generations: list[GenerationTally] = []  # one per generating request, in order
        self.create_failure: tuple[str, int | None] | None = None
        self.create_stall_s = 0.0
        self._loaded: dict[_LoadKey, _Loaded] = {}
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
        self.unload(lambda key: key.model_digest not in in_use or
                    (key.adapter_digest is not None and key.adapter_digest not in in_use))

    def new_generation(self) -> GenerationTally:
        tally = GenerationTally()
        self.generations.append(tally)
        return tally

    def llama(self, model: StoredModel, num_ctx: int, keep_alive_s: float, *, embedding: bool = False) -> _Loaded:
        """The llama.cpp context for ``model`` (loaded now unless it is), the most recently used; the least recently
        used beyond ``MAX_LOADED`` and those past their ``expires_at`` are unloaded first."""
        self.expire()
        key = _LoadKey(model.model_digest, model.adapter_digest, num_ctx, embedding)
        with self.lock:
            loaded = self._loaded.pop(key, None)
            if loaded is None:
                loaded = self._load(model, key)
            loaded.model = model
            self._loaded[key] = loaded  # most recently used last
            self._set_expiry(key, keep_alive_s)  # Ollama's estimate while a request runs
            while len(self._loaded) > MAX_LOADED:
                evicted = self._loaded.pop(next(iter(self._loaded)))
                with evicted.lock:
                    evicted.llm.close()
            return loaded

    def _load(self, model: StoredModel, key: _LoadKey) -> _Loaded:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        # an embedding reads a whole input in one batch, pooled as the mean of its token states
        extra: dict[str, Any] = {"embedding": True, "pooling_type": LLAMA_POOLING_TYPE_MEAN, "n_batch": key.num_ctx,
                                 "n_ubatch": key.num_ctx} if key.embedding else {}
        digests = [digest for digest in (key.model_digest, key.adapter_digest) if digest]
        adapter = str(self.blob_path(key.adapter_digest)) if key.adapter_digest else None
        llm = Llama(model_path=str(self.blob_path(key.model_digest)), lora_path=adapter, n_ctx=key.num_ctx,
                    n_threads=LLAMA_THREADS, n_threads_batch=LLAMA_THREADS, verbose=False, **extra)
        return _Loaded(llm=llm, lock=threading.Lock(), model=model,
                       size=sum(self.blob_path(digest).stat().st_size for digest in digests), expires_at=time.time())

    def release(self, loaded: _Loaded, keep_alive_s: float) -> None:
        """A call is over: the model stays ``keep_alive_s`` more, or goes now when that is 0."""
        if keep_alive_s == 0:
            self.unload_model(loaded.model)
            return
        with self.lock:
            key = next((key for key, value in self._loaded.items() if value is loaded), None)
            if key is not None:
                self._set_expiry(key, keep_alive_s)

    def _set_expiry(self, key: _LoadKey, keep_alive_s: float) -> None:
        """The latest call's keep_alive holds for every context of the model's blobs: they are one runner in
        Ollama (with ``self.lock`` held)."""
        expires_at = time.time() + keep_alive_s
        for other, loaded in self._loaded.items():
            if (other.model_digest, other.adapter_digest) == (key.model_digest, key.adapter_digest):
                loaded.expires_at = expires_at

    def unload_model(self, model: StoredModel) -> None:
        """Every context of ``model``'s blobs (Ollama's ``expireRunner``)."""
        self.unload(lambda key: (key.model_digest, key.adapter_digest) == (model.model_digest, model.adapter_digest))

    def expire(self) -> None:
        """Unload what is past its ``expires_at`` and idle (Ollama's timer, checked lazily)."""
        moment = time.time()
        self.unload(lambda key: self._loaded[key].expires_at <= moment and not self._loaded[key].lock.locked())

    def running(self) -> list[tuple[_LoadKey, _Loaded]]:
        self.expire()
        with self.lock:
            return list(self._loaded.items())

    def unload(self, which: Callable[[_LoadKey], bool] | None = None) -> None:
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


class _RequestError(Exception):
    """A refusal with Ollama's text and status, raised where the request is checked or run."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _keep_alive_s(value: Any) -> float:
    """``keep_alive`` as Ollama's ``Duration.UnmarshalJSON`` reads it: a number is seconds, a string a Go duration,
    a negative either way forever; absent, the default. What it refuses is a 400 (the request's binding)."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go_type = {bool: "bool", dict: "map[string]interface {}", list: "[]interface {}"}[type(value)]
        raise _RequestError(f"Unsupported type: '{go_type}'", 400)
    seconds = _go_duration_s(value) if isinstance(value, str) else float(value)
    return FOREVER_S if seconds < 0 else seconds


def _go_duration_s(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds ("1h30m", "-1s", "0")."""
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text.lstrip("+-")
    if rest == "0":
        return 0.0
    parts = _GO_DURATION_PART.findall(rest)
    if not rest or "".join(number + unit for number, unit in parts) != rest:
        raise _RequestError(f"time: invalid duration {go_quote(text)}", 400)
    return sign * sum(float(number) * _GO_DURATION_UNIT_S[unit] for number, unit in parts)


def _option_error(options: dict[str, Any]) -> str | None:
    """What ``Options.FromMap`` says of the first option of the wrong type (None when all fit)."""
    for key, value in options.items():
        kind = OPTION_TYPES.get(key)
        if kind is None or value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        fits = {"integer": number, "float32": number, "boolean": isinstance(value, bool),
                "array": isinstance(value, list)}[kind]
        if not fits:
            return f"option {go_quote(key)} must be of type {kind}"
        if kind == "array" and not all(isinstance(item, str) for item in value):
            return f"option {go_quote(key)} must be of an array of strings"
    return None


def _grammar(output_format: Any) -> Any:
    """The llama.cpp grammar for ``format``: None for free text, JSON for ``"json"``, the schema's own for an
    object; anything else is Ollama's 500, a schema llama.cpp cannot use its runner's 400."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if output_format in (None, ""):
        return None
    if output_format == "json":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    if not isinstance(output_format, dict):
        raise _RequestError(f"invalid format: {go_quote(json.dumps(output_format))}; expected \"json\" or a valid "
                            "JSON Schema object", 500)
    try:
        return LlamaGrammar.from_json_schema(json.dumps(output_format), verbose=False)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _RequestError(f"JSON schema conversion failed: {exc}", 400) from None


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

    @_refusing
    async def chat(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        refused = _type_error(body, {"model": str, "messages": list, "options": dict, "stream": bool})
        if refused is not None:
            return refused
        keep_alive_s = _keep_alive_s(body.get("keep_alive"))
        if not body.get("model"):
            return _error("model is required", 400)
        if parse_ollama_name(body["model"]) is None:
            return _error(f"name {go_quote(body['model'])} is invalid", 400)
        if body.get("tools") or body.get("think"):
            return _error("the contract Ollama does not implement tools or think", 501)
        model = state.find(body["model"])
        if model is None:
            return _error(f"model '{body['model']}' not found", 404)
        messages = [{"role": str(message.get("role", "")), "content": str(message.get("content") or "")}
                    for message in body.get("messages") or []]
        if not messages:
            return await _load_or_unload(state, model, body, "chat", keep_alive_s)
        if model.template is None:
            return _error("the contract Ollama renders only a template given at create", 500)
        return await _answer(_Turn(state, model, body, "chat", keep_alive_s, messages=messages), body)

    @_refusing
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        refused = _type_error(body, {"model": str, "prompt": str, "system": str, "raw": bool, "options": dict,
                                     "stream": bool})
        if refused is not None:
            return refused
        keep_alive_s = _keep_alive_s(body.get("keep_alive"))
        unsupported = [key for key in ("template", "suffix", "images", "context", "think") if body.get(key)]
        if unsupported:
            return _error(f"the contract Ollama does not implement {unsupported} (afina does not send them)", 501)
        if parse_ollama_name(body.get("model") or "") is None:
            return _error("invalid model name", 400)
        model = state.find(body["model"])
        if model is None:
            return _error(f"model '{body['model']}' not found", 404)
        prompt, system = body.get("prompt") or "", body.get("system") or ""
        if not prompt:
            return await _load_or_unload(state, model, body, "generate", keep_alive_s)
        if body.get("raw"):
            if system:
                return _error("raw mode does not support template, system, or context", 400)
            return await _answer(_Turn(state, model, body, "generate", keep_alive_s, raw_prompt=prompt), body)
        if model.template is None:
            return _error("the contract Ollama renders only a template given at create", 500)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return await _answer(_Turn(state, model, body, "generate", keep_alive_s, messages=messages), body)

    @_refusing
    async def embed(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        refused = _type_error(body, {"model": str, "truncate": bool, "options": dict})
        if refused is not None:
            return refused
        keep_alive_s = _keep_alive_s(body.get("keep_alive"))
        if body.get("dimensions"):
            return _error("the contract Ollama does not implement dimensions (afina does not send it)", 501)
        if parse_ollama_name(body.get("model") or "") is None:
            return _error("invalid model name", 400)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs] if inputs else []
        if not isinstance(inputs, list | None) or not all(isinstance(item, str) for item in inputs or []):
            return _error("invalid input type", 400)
        model = state.find(body["model"])
        if model is None:
            return _error(f"model {go_quote(body['model'])} not found, try pulling it first", 404)
        return JSONResponse(await to_thread.run_sync(_embed, state, model, body, inputs or [], keep_alive_s))

    async def ps(request: Request) -> Response:
        return JSONResponse(_ps_response(state))

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
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
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


# --- generation -------------------------------------------------------------------------------------------------

def _refusing(handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """A route whose ``_RequestError`` is answered as Ollama answers an error before any output."""

    @functools.wraps(handler)
    async def route(request: Any) -> Any:
        try:
            return await handler(request)
        except _RequestError as exc:
            return _error(str(exc), exc.status)

    return route


def _options(model: StoredModel, body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's defaults, under the model's parameters, under the request's options (a null one is unset); a
    wrongly typed option is refused as ``handleScheduleError`` refuses it: 500."""
    requested = {key: value for key, value in (body.get("options") or {}).items() if value is not None}
    refused = _option_error(requested)
    if refused is not None:
        raise _RequestError(refused, 500)
    return {**DEFAULT_OPTIONS, **model.parameters, **requested}


def _num_ctx(options: dict[str, Any]) -> int:
    return int(options.get("num_ctx") or DEFAULT_NUM_CTX)


def _chunk(endpoint: str, requested: str, content: str, **final: Any) -> dict[str, Any]:
    """One line of /api/chat (``message``) or /api/generate (``response``); ``final`` fields make it the last."""
    answer = {"message": {"role": "assistant", "content": content}} if endpoint == "chat" else {"response": content}
    return {"model": requested, "created_at": _rfc3339(time.time()), **answer, "done": bool(final), **final}


async def _load_or_unload(state: OllamaState, model: StoredModel, body: dict[str, Any], endpoint: str,
                          keep_alive_s: float) -> Any:
    """An empty chat or prompt: with ``keep_alive: 0`` the model is unloaded, otherwise loaded."""
    from starlette.responses import JSONResponse

    if keep_alive_s == 0:
        await to_thread.run_sync(state.unload_model, model)
        return JSONResponse(_chunk(endpoint, body["model"], "", done_reason="unload"))
    options = _options(model, body)
    loaded = await to_thread.run_sync(state.llama, model, _num_ctx(options), keep_alive_s)
    state.release(loaded, keep_alive_s)
    return JSONResponse(_chunk(endpoint, body["model"], "", done_reason="load"))


async def _answer(turn: _Turn, body: dict[str, Any]) -> Any:
    """What is refused before the first token is the HTTP status; then NDJSON chunks, or one object."""
    from starlette.responses import JSONResponse, StreamingResponse

    await to_thread.run_sync(turn.prepare)
    if body.get("stream") is False:
        return JSONResponse(await to_thread.run_sync(turn.whole))
    return StreamingResponse(_ndjson(turn.stream()), media_type="application/x-ndjson")


async def _ndjson(chunks: Iterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The chunks as NDJSON lines, each made in a worker thread. A client that goes away cancels this (Starlette
    listens for the disconnect) once the token being made is done (anyio waits for its thread), and closing
    ``chunks`` stops llama.cpp, as Ollama cancels its runner's request."""
    try:
        while (chunk := await to_thread.run_sync(next, chunks, None)) is not None:
            yield (json.dumps(chunk) + "\n").encode()
    finally:
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(chunks.close)


class _Turn:
    """One /api/chat or /api/generate: the prompt Ollama would build, then llama.cpp's tokens as Ollama's chunks."""

    def __init__(self, state: OllamaState, model: StoredModel, body: dict[str, Any], endpoint: str,
                 keep_alive_s: float, *, messages: list[dict[str, str]] | None = None,
                 raw_prompt: str | None = None) -> None:
        self.state, self.model, self.endpoint, self.keep_alive_s = state, model, endpoint, keep_alive_s
        self.requested: str = body["model"]
        self.options = _options(model, body)
        self.output_format = body.get("format")
        if messages is not None and messages[0]["role"] != "system" and model.system:
            messages = [{"role": "system", "content": model.system}, *messages]
        self.messages, self.raw_prompt = messages, raw_prompt
        self.num_ctx = _num_ctx(self.options)
        self.started = time.monotonic_ns()

    def prepare(self) -> None:
        """Load the model, build the prompt and the grammar: what fails here is the answer's HTTP status."""
        try:
            self.loaded = self.state.llama(self.model, self.num_ctx, self.keep_alive_s)
        except Exception as exc:  # noqa: BLE001 - llama.cpp refusing the blob is the answer
            raise _RequestError(f"llama runner process has terminated: {exc}", 500) from exc
        self.loaded_at = time.monotonic_ns()
        self.prompt = self.raw_prompt if self.raw_prompt is not None else self._chat_prompt()
        self.prompt_tokens = self._tokenize(self.prompt)
        if len(self.prompt_tokens) >= self.num_ctx:
            raise _RequestError("the input length exceeds the context length", 400)
        self.grammar = _grammar(self.output_format)

    def _tokenize(self, text: str) -> list[int]:
        return self.loaded.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _chat_prompt(self) -> str:
        """Ollama's ``chatPrompt``: the oldest turns dropped (system messages kept) until the prompt fits num_ctx."""
        assert self.messages is not None
        for start in range(len(self.messages)):
            kept = [message for message in self.messages[:start] if message["role"] == "system"]
            try:
                prompt = ollama_prompt(self.model.template or "", kept + self.messages[start:])
            except (ValueError, KeyError, NameError) as exc:
                raise _RequestError(f"template: {exc}", 500) from exc
            if len(self._tokenize(prompt)) <= self.num_ctx:
                break
        return prompt

    def _sampling(self, on_token: Callable[[Any, Any], bool]) -> dict[str, Any]:
        """llama-cpp-python's arguments for the options (num_predict and seed -1: no limit, a random seed)."""
        from llama_cpp import StoppingCriteriaList

        options = self.options
        num_predict, seed = int(options["num_predict"]), int(options["seed"])
        return {"max_tokens": num_predict if num_predict > 0 else None, "temperature": float(options["temperature"]),
                "top_k": int(options["top_k"]), "top_p": float(options["top_p"]), "min_p": float(options["min_p"]),
                "repeat_penalty": float(options["repeat_penalty"]),
                "presence_penalty": float(options["presence_penalty"]),
                "frequency_penalty": float(options["frequency_penalty"]), "seed": seed if seed >= 0 else None,
                "stop": list(options.get("stop") or []), "grammar": self.grammar,
                "stopping_criteria": StoppingCriteriaList([on_token])}

    def _generate(self) -> Iterator[str | dict[str, Any]]:
        """The text pieces, then the last chunk's fields; closed early, llama.cpp stops at the next token."""
        tally = self.state.new_generation()
        first_token_ns = 0

        def count(input_ids: Any, logits: Any) -> bool:  # a stopping criterion that never stops: a token meter
            nonlocal first_token_ns
            tally.tokens += 1
            first_token_ns = first_token_ns or time.monotonic_ns()
            return False

        text: list[str] = []
        finish = "stop"
        try:
            with self.loaded.lock:
                llm = self.loaded.llm
                # the whole prompt evaluated afresh: reusing the previous chat's cache shifts the logits enough to
                # change a greedy answer, and a test compares answers
                llm.reset()
                eval_started = time.monotonic_ns()
                pieces = llm.create_completion(prompt=self.prompt_tokens, stream=True, **self._sampling(count))
                try:
                    for piece in pieces:
                        choice = piece["choices"][0]
                        if choice["text"]:
                            text.append(choice["text"])
                            yield choice["text"]
                        finish = choice.get("finish_reason") or finish
                    tally.completed = True
                finally:
                    pieces.close()
                answer = "".join(text)
                eval_count = len(llm.tokenize(answer.encode("utf-8"), add_bos=False, special=True))
                # /api/generate's deprecated ``context``, which raw mode does not return
                context = self._tokenize(self.prompt + answer) if self.endpoint == "generate" and \
                    self.raw_prompt is None else None
        finally:
            tally.stopped = True
            self.state.release(self.loaded, self.keep_alive_s)
        ended = time.monotonic_ns()
        first_token_ns = first_token_ns or ended
        yield {"done_reason": "length" if finish == "length" else "stop",
               **({"context": context} if context is not None else {}),
               "total_duration": ended - self.started, "load_duration": self.loaded_at - self.started,
               "prompt_eval_count": len(self.prompt_tokens), "prompt_eval_duration": first_token_ns - eval_started,
               "eval_count": eval_count, "eval_duration": ended - first_token_ns}

    def stream(self) -> Iterator[dict[str, Any]]:
        items = self._generate()
        try:
            for item in items:
                yield _chunk(self.endpoint, self.requested, item) if isinstance(item, str) else \
                    _chunk(self.endpoint, self.requested, "", **item)
        finally:
            items.close()

    def whole(self) -> dict[str, Any]:
        *pieces, final = self._generate()
        return _chunk(self.endpoint, self.requested, "".join(pieces), **final)  # type: ignore[arg-type]


def _embed(state: OllamaState, model: StoredModel, body: dict[str, Any], inputs: list[str],
           keep_alive_s: float) -> dict[str, Any]:
    """/api/embed's answer: one unit-norm vector per input, each truncated to num_ctx unless ``truncate`` is
    false (then a longer one is the 400 Ollama answers)."""
    started = time.monotonic_ns()
    num_ctx = _num_ctx(_options(model, body))
    loaded = state.llama(model, num_ctx, keep_alive_s, embedding=True)
    loaded_at = time.monotonic_ns()
    vectors: list[list[float]] = []
    tokens = 0
    try:
        with loaded.lock:
            for text in inputs:
                if body.get("truncate") is False and \
                        len(loaded.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)) > num_ctx:
                    raise _RequestError("the input length exceeds the context length", 400)
                vector, used = loaded.llm.embed(text, normalize=True, truncate=True, return_count=True)
                vectors.append(vector)
                tokens += used
    finally:
        state.release(loaded, keep_alive_s)
    if not inputs:  # Ollama loads the model and answers no vectors, nor any metrics
        return {"model": body["model"], "embeddings": []}
    return {"model": body["model"], "embeddings": vectors, "total_duration": time.monotonic_ns() - started,
            "load_duration": loaded_at - started, "prompt_eval_count": tokens}


def _ps_response(state: OllamaState) -> dict[str, Any]:
    """/api/ps: one line per model (Ollama has one runner per model; here its chat and embedding contexts are one
    line), the longest to live first."""
    latest: dict[str, tuple[_LoadKey, _Loaded]] = {}
    for key, loaded in state.running():
        name = loaded.model.name.shortest()
        if name not in latest or latest[name][1].expires_at < loaded.expires_at:
            latest[name] = (key, loaded)
    ordered = sorted(latest.items(), key=lambda item: -item[1][1].expires_at)
    return {"models": [
        {"name": name, "model": name, "size": loaded.size, "digest": loaded.model.manifest_digest,
         "details": loaded.model.details, "expires_at": _rfc3339(loaded.expires_at), "size_vram": 0,
         "context_length": key.num_ctx}
        for name, (key, loaded) in ordered]}


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
