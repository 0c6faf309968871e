"""One ``llama_cpp.server`` process per model, with requests proxied to it.

Keeps llama.cpp out of the gateway's process (a crash or a leak takes one server
down, not the front door). A server starts on a model's first request, listens on
loopback only, and is stopped by its PID (its whole process group) when evicted, when
its ``keep_alive`` runs out, or when the gateway shuts down (the ``LoadedPool`` keeps
that book, as it does for the in-process backend: at most ``settings.max_loaded_models``
servers, the least recently used making room). A model gets one server per context
length it is asked for, and one more for embeddings (llama.cpp embeds only with a
context made for it). Each request is spoken to its server by an ``OpenAIUpstream``,
in llama_cpp.server's dialect.

A server that fails (it exits while starting, never gets ready, or answers 5xx) is
reported to the user as a short message with an error id; the server's log tail and
its own message go to the operator's log under the same id, scrubbed of secrets. Its
log holds paths and library internals a user must not see.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
from anyio import to_thread

from afina.core.errors import AfinaError, InferenceUnavailable
from afina.core.logging import log_event, new_error_id
from afina.core.settings import Settings
from afina.gateway.inference.base import (
    Embeddings,
    Generation,
    GenerationRequest,
    LoadedModel,
    ServedModel,
    TextDelta,
    UpstreamError,
    input_too_long,
    refuse_token_level,
)
from afina.gateway.inference.grammar import grammar_for
from afina.gateway.inference.openai_upstream import OpenAIUpstream
from afina.gateway.inference.pool import Entry, LoadedPool, Slot
from afina.gateway.inference.templates import refused_by_template

log = logging.getLogger("afina.gateway.inference")
READY_TIMEOUT_S = 120.0
PORT_SCAN = 200
LOG_TAIL_BYTES = 4000  # of a failed server's log, into the operator's log line


@dataclass
class _Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    upstream: OpenAIUpstream
    model_file: str  # the GGUF's file name, for the operator's log
    failed: bool = False  # its last call failed: checked before the next one goes to it

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def log_tail(log_path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a server's log (empty if it wrote none)."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - limit))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _unavailable(what: str, event: str, **detail: object) -> InferenceUnavailable:
    """A 503 a user may read (``what`` and an error id); ``detail`` goes to the operator log only."""
    error_id = new_error_id()
    log_event(log, event, logging.ERROR, error_id=error_id, **detail)
    return InferenceUnavailable(f"{what[:1].upper()}{what[1:]}; error id {error_id}. Try again later, or give "
                                "the operator this id.")


def stop_server_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


class LlamaServerBackend:
    """Starts, reuses and stops llama.cpp servers; each call is forwarded to its model's server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ports: set[int] = set()  # of every live server, ready or still starting
        self._pool: LoadedPool[_Server] = LoadedPool(capacity=settings.max_loaded_models,
                                                     keep_alive_s=settings.keep_alive_s, open=self._start,
                                                     close=self._stop, usable=self._usable)

    # --- servers ---------------------------------------------------------------------------------

    def _pick_port(self) -> int:
        base = self.settings.llamacpp_server_base_port
        for port in range(base, base + PORT_SCAN):
            if port not in self._ports and _port_free(port):
                self._ports.add(port)
                return port
        raise _unavailable("no capacity to start the model now", "llamacpp_server.no_port",
                           ports=f"{base}..{base + PORT_SCAN - 1}")

    def _spawn(self, slot: Slot, port: int) -> _Server:
        log_dir = self.settings.resolved_work_dir / "llamacpp-server"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"server-{port}.log"
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(slot.path), "--host", "127.0.0.1",
                   "--port", str(port), "--n_ctx", str(slot.n_ctx)]
        if slot.embedding:
            command += ["--embedding", "true"]
        if self.settings.inference_threads:
            command += ["--n_threads", str(self.settings.inference_threads)]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        log_event(log, "llamacpp_server.started", pid=process.pid, port=port, model=slot.path.name,
                  n_ctx=slot.n_ctx, embedding=slot.embedding)
        # llama_cpp.server takes a schema inside json_object and never reports usage in a stream
        upstream = OpenAIUpstream(f"http://127.0.0.1:{port}/v1", name=f"llamacpp-server:{port}",
                                  schema_in_json_object=True, stream_usage=False)
        return _Server(process=process, port=port, log_path=log_path, upstream=upstream, model_file=slot.path.name)

    async def _wait_ready(self, server: _Server) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise _unavailable("the model could not be started", "llamacpp_server.start_failed",
                                   model=server.model_file, returncode=server.process.returncode,
                                   log_tail=log_tail(server.log_path))
            if await server.upstream.health():
                return
            await anyio.sleep(0.1)
        raise _unavailable(f"the model did not start within {READY_TIMEOUT_S:.0f}s", "llamacpp_server.not_ready",
                           model=server.model_file, log_tail=log_tail(server.log_path))

    async def _stop(self, server: _Server) -> None:
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(stop_server_process, server.process)
            await server.upstream.close()
        self._ports.discard(server.port)
        log_event(log, "llamacpp_server.stopped", pid=server.process.pid)

    def _slot(self, model: ServedModel, num_ctx: int | None, *, embedding: bool = False) -> Slot:
        return Slot.of(model, num_ctx, self.settings.inference_n_ctx, embedding=embedding)

    async def _start(self, slot: Slot, model: ServedModel) -> _Server:
        """A ready server for ``slot``; nothing left running if it does not get ready."""
        port = self._pick_port()  # here, not in the worker thread: two starts never share a port
        try:
            server = await to_thread.run_sync(self._spawn, slot, port)
        except BaseException:
            self._ports.discard(port)
            raise
        try:
            await self._wait_ready(server)
        except BaseException:
            await self._stop(server)
            raise
        return server

    async def _usable(self, entry: Entry[_Server]) -> bool:
        """Whether the server can take a call: running, and answering if its last call failed (a server
        killed mid-answer breaks the connection a moment before its process is gone). Only an idle server
        is asked: a busy llama_cpp.server answers nothing, its model list included, until it is done."""
        server = entry.handle
        usable = server.process.poll() is None
        if usable and server.failed and entry.users == 0:
            server.failed = False
            usable = await server.upstream.health()
        if not usable:  # stopped for good first, so that its exit status is known (the pool then closes it)
            await to_thread.run_sync(stop_server_process, server.process)
            log_event(log, "llamacpp_server.died", logging.WARNING, pid=server.process.pid,
                      returncode=server.process.returncode, log_tail=log_tail(server.log_path))
        return usable

    def _failed(self, server: _Server, exc: UpstreamError, request: GenerationRequest | None = None) -> AfinaError:
        """A local server's failure: no other target can stand in for a file only it serves. A conversation the
        model's chat template refuses (the server answers it with a 500) is the caller's 400."""
        if request is not None and request.messages and request.model.path is not None and exc.status >= 500:
            refusal = refused_by_template(request.model.path, request.messages)
            if refusal is not None:
                return refusal
        server.failed = True
        exited: dict[str, object] = {}
        if server.process.poll() is not None:  # it died under the request: its log says why
            exited = {"returncode": server.process.returncode, "log_tail": log_tail(server.log_path)}
        return _unavailable("the model failed to answer", "llamacpp_server.upstream_error", status=exc.status,
                            model=server.model_file, upstream_message=str(exc), **exited)

    # --- generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        refuse_token_level(request)  # its servers run without logits for every token (logits_all)
        grammar_for(request.output_format)  # a schema llama.cpp cannot use is the caller's 400, not a server's 500
        slot = self._slot(request.model, request.num_ctx)
        entry, load_ns = await self._pool.acquire(slot, request.model)
        server = entry.handle
        try:
            generation = await server.upstream.generate(request)
        except UpstreamError as exc:
            raise self._failed(server, exc, request) from None
        finally:
            await self._pool.release(slot, entry, request.keep_alive_s)
        generation.load_ns = load_ns
        return generation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        """The server's stream, after a one-token call that counts the prompt exactly (the server reports no
        usage in a stream; the streamed call then reuses the evaluated prompt, as llama.cpp keeps the common
        prefix) and refuses a prompt longer than the context with a 400 (in a stream the server would
        answer 200 and then nothing)."""
        refuse_token_level(request)
        grammar_for(request.output_format)
        slot = self._slot(request.model, request.num_ctx)
        entry, load_ns = await self._pool.acquire(slot, request.model)
        server = entry.handle
        try:
            started = time.perf_counter_ns()
            probe = await server.upstream.generate(replace(request, output_format=None,
                                                           sampling=replace(request.sampling, max_tokens=1)))
            probe_ns = time.perf_counter_ns() - started
            async with aclosing(server.upstream.stream(request)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Generation):
                        piece.prompt_tokens = probe.prompt_tokens
                        piece.load_ns = load_ns
                        piece.prompt_eval_ns += probe_ns
                    yield piece
        except UpstreamError as exc:
            raise self._failed(server, exc, request) from None
        finally:
            await self._pool.release(slot, entry, request.keep_alive_s)

    # --- embeddings, housekeeping ----------------------------------------------------------------

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        """One input per call to the server: with several, llama-cpp-python (0.3.x) slices every per-token
        state after the first input's at the wrong offset, so only the first vector of a batch is right."""
        slot = self._slot(model, None, embedding=True)
        entry, load_ns = await self._pool.acquire(slot, model)
        server = entry.handle
        vectors: list[list[float]] = []
        prompt_tokens = 0
        try:
            for index, text in enumerate(inputs):
                if not truncate:
                    await self._refuse_too_long(server, index, text, slot.n_ctx)
                one = await server.upstream.embed(model, [text])
                vectors += one.vectors
                prompt_tokens += one.prompt_tokens
        except UpstreamError as exc:
            raise self._failed(server, exc) from None
        finally:
            await self._pool.release(slot, entry, keep_alive_s)
        return Embeddings(vectors=vectors, prompt_tokens=prompt_tokens, load_ns=load_ns)

    async def _refuse_too_long(self, server: _Server, index: int, text: str, n_ctx: int) -> None:
        """An ``InvalidRequest`` when ``text`` is longer than the context, counted by the server's tokenizer
        (the server would truncate it silently)."""
        try:
            answer = await server.upstream.post_json_to(f"{server.base_url}/extras/tokenize", {"input": text})
            tokens = len(answer.get("tokens") or [])
        except UpstreamError as exc:
            raise UpstreamError(f"tokenizing input {index} failed: {exc}") from None
        if tokens > n_ctx:
            raise input_too_long(index, tokens, n_ctx)

    async def loaded(self) -> list[LoadedModel]:
        return await self._pool.loaded()

    async def unload(self, model: ServedModel) -> None:
        await self._pool.evict_model(model)

    async def close(self) -> None:
        """Stop every idle server now, and each busy one when its last call ends (the gateway is stopping)."""
        await self._pool.close()
