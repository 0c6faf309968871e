"""One ``llama_cpp.server`` process per model, with requests proxied to it.

Keeps llama.cpp out of the gateway's process (a crash or a leak takes one server
down, not the front door). A server starts on a model's first request, listens on
loopback only, and is stopped by its PID (its whole process group) when evicted or
when the gateway shuts down. At most ``settings.max_loaded_models`` servers run;
the least recently used idle one makes room.

A server that fails (it exits while starting, never gets ready, or answers 5xx) is
reported to the user as a short message with an error id; the server's log tail and
its own message go to the operator's log under the same id, scrubbed of secrets. Its
log holds paths and library internals a user must not see.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
from anyio import to_thread

from afina.core.errors import InferenceUnavailable, InvalidRequest
from afina.core.logging import log_event, new_error_id, redact
from afina.core.settings import Settings
from afina.gateway.inference.base import ChatRequest, usage_chunk

log = logging.getLogger("afina.gateway.inference")
READY_TIMEOUT_S = 120.0
PORT_SCAN = 200
LOG_TAIL_BYTES = 4000  # of a failed server's log, into the operator's log line


@dataclass
class _Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    model_file: str = ""  # the GGUF's file name, for the operator's log
    users: int = 0

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
    """Starts, reuses and stops llama.cpp servers; speaks OpenAI's chat API to them over httpx."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._servers: OrderedDict[Path, _Server] = OrderedDict()
        self._start_locks: dict[Path, asyncio.Lock] = {}
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
        return self._client

    def _pick_port(self) -> int:
        taken = {server.port for server in self._servers.values()}
        base = self.settings.llamacpp_server_base_port
        for port in range(base, base + PORT_SCAN):
            if port not in taken and _port_free(port):
                return port
        raise _unavailable("no capacity to start the model now", "llamacpp_server.no_port",
                           ports=f"{base}..{base + PORT_SCAN - 1}")

    def _spawn(self, path: Path) -> _Server:
        port = self._pick_port()
        log_dir = self.settings.resolved_work_dir / "llamacpp-server"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"server-{port}.log"
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                   "--port", str(port), "--n_ctx", str(self.settings.inference_n_ctx)]
        if self.settings.inference_threads:
            command += ["--n_threads", str(self.settings.inference_threads)]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        log_event(log, "llamacpp_server.started", pid=process.pid, port=port, model=path.name)
        return _Server(process=process, port=port, log_path=log_path, model_file=path.name)

    async def _wait_ready(self, server: _Server) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise _unavailable("the model could not be started", "llamacpp_server.start_failed",
                                   model=server.model_file, returncode=server.process.returncode,
                                   log_tail=log_tail(server.log_path))
            try:
                response = await self.client.get(f"{server.base_url}/v1/models", timeout=2.0)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)
        await to_thread.run_sync(stop_server_process, server.process)
        raise _unavailable(f"the model did not start within {READY_TIMEOUT_S:.0f}s", "llamacpp_server.not_ready",
                           model=server.model_file, log_tail=log_tail(server.log_path))

    async def _acquire(self, path: Path) -> _Server:
        lock = self._start_locks.setdefault(path, asyncio.Lock())
        async with lock:
            server = self._servers.get(path)
            if server is not None and server.process.poll() is not None:
                log_event(log, "llamacpp_server.died", logging.WARNING, pid=server.process.pid)
                del self._servers[path]
                server = None
            if server is None:
                await self._evict_idle(self.settings.max_loaded_models - 1)
                server = await to_thread.run_sync(self._spawn, path)
                try:
                    await self._wait_ready(server)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await to_thread.run_sync(stop_server_process, server.process)
                    raise
                self._servers[path] = server
            self._servers.move_to_end(path)
            server.users += 1
            return server

    async def _evict_idle(self, keep: int) -> None:
        """Stop least recently used servers with no request in flight until at most ``keep`` run."""
        for path in list(self._servers):
            if len(self._servers) <= keep:
                return
            server = self._servers[path]
            if server.users == 0:
                del self._servers[path]
                await to_thread.run_sync(stop_server_process, server.process)
                log_event(log, "llamacpp_server.stopped", pid=server.process.pid)

    @staticmethod
    def _body(request: ChatRequest, **extra: Any) -> dict[str, Any]:
        return {"model": request.model_path.name, "messages": request.messages, **request.options, **extra}

    async def _post(self, server: _Server, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(f"{server.base_url}/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise InferenceUnavailable(f"llama.cpp server unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise _upstream_error(response.status_code, response.content)
        return response.json()

    async def chat(self, request: ChatRequest) -> dict[str, Any]:
        server = await self._acquire(request.model_path)
        try:
            return await self._post(server, self._body(request))
        finally:
            server.users -= 1

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        server = await self._acquire(request.model_path)
        try:
            prompt_tokens = 0
            if request.include_usage:
                # llama.cpp's server reports no usage in streams; a one-token call counts the prompt exactly,
                # and the streamed call then reuses the evaluated prompt (llama.cpp keeps the common prefix)
                probe = await self._post(server, self._body(request, max_tokens=1, stream=False))
                prompt_tokens = int(probe.get("usage", {}).get("prompt_tokens", 0))
            completion_tokens = 0
            async with self.client.stream("POST", f"{server.base_url}/v1/chat/completions",
                                          json=self._body(request, stream=True)) as response:
                if response.status_code != 200:
                    raise _upstream_error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = orjson.loads(data)
                    if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", [])):
                        completion_tokens += 1  # the server sends one chunk per generated token
                    yield chunk
            yield usage_chunk(prompt_tokens, completion_tokens)
        except httpx.TransportError as exc:
            raise InferenceUnavailable(f"llama.cpp server unreachable: {type(exc).__name__}") from None
        finally:
            server.users -= 1

    async def close(self) -> None:
        servers = list(self._servers.values())
        self._servers.clear()
        for server in servers:
            await to_thread.run_sync(stop_server_process, server.process)
            log_event(log, "llamacpp_server.stopped", pid=server.process.pid)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _upstream_error(status: int, content: bytes) -> Exception:
    """The server's own message for a request it refused (4xx); a 503 with an error id for anything else."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = {}
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        message = (error.get("message") if isinstance(error, dict) else error) or body.get("detail")
    message = redact(str(message or content[:300].decode(errors="replace")))
    if 400 <= status < 500:
        code = "context_length_exceeded" if "context" in message.lower() else "invalid_request"
        return InvalidRequest(message, param="messages", code=code)
    return _unavailable("the model failed to answer", "llamacpp_server.upstream_error", status=status,
                        upstream_message=message)

