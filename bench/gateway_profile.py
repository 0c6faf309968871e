"""Where a proxied request's CPU goes inside the gateway: cProfile of the ASGI app driven in process.

Run: ``.venv/bin/python bench/gateway_profile.py`` (``--requests``, ``--stream``, ``--top``, ``--path``).

The instant upstream of ``bench/gateway_overhead.py`` runs in its own process (its CPU is not profiled); the
gateway is ``create_app`` in this process with a temp ``AFINA_HOME``, that upstream in ``AFINA_UPSTREAMS``, an
API key and the route ``bench`` → the upstream's model, as the overhead bench sets it up. Requests go straight
to the ASGI app (no uvicorn, so no HTTP parsing of the gateway's own side; the aiohttp client to the upstream
is real), one after the other on one event loop. Printed: CPU µs per request without the profiler (best of
alternating rounds), Python function calls per request (deterministic), and the functions with the most own
time and the most cumulative time under the profiler (which over-weights Python-heavy code).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_overhead as overhead  # noqa: E402  (the bench's upstream and server helpers)

BODIES = {
    "/v1/chat/completions": lambda stream: overhead.chat_body(overhead.ROUTE, stream),
    "/v1/embeddings": lambda stream: {"model": overhead.ROUTE, "input": "hi"},
}


async def call(app: Any, method: str, path: str, key: str, body: bytes) -> tuple[int, bytes]:
    """One request through the ASGI interface, as a server would make it."""
    sent: list[dict[str, Any]] = []
    pending = [body]

    async def receive() -> dict[str, Any]:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        await asyncio.Event().wait()  # the client stays until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000), "state": {}}
    await app(scope, receive, send)
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    return status, b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")


async def drive(app: Any, path: str, key: str, body: bytes, n: int) -> None:
    for _ in range(n):
        status, answer = await call(app, "POST", path, key, body)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measured round")
    parser.add_argument("--rounds", type=int, default=5, help="CPU-time rounds (the best is reported)")
    parser.add_argument("--stream", action="store_true", help="streamed chat completions (SSE)")
    parser.add_argument("--path", default="/v1/chat/completions", choices=sorted(BODIES))
    parser.add_argument("--top", type=int, default=30, help="functions listed per table")
    parser.add_argument("--out", type=Path, default=None, help="also write the pstats dump here")
    args = parser.parse_args()

    overhead.ensure_aiohttp()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # what uvicorn runs the gateway on
    except ImportError:
        pass
    workdir = Path(tempfile.mkdtemp(prefix="afina-gateway-profile-"))
    upstream = overhead.start_upstream(workdir)
    try:
        upstreams = {"up": {"kind": "openai", "base_url": f"http://127.0.0.1:{upstream.port}/v1"}}
        for name, value in overhead.afina_env(workdir / "home", AFINA_UPSTREAMS=json.dumps(upstreams)).items():
            if name.startswith("AFINA_"):
                os.environ[name] = value
        from afina.core.db import repository as repo
        from afina.core.runtime import Runtime
        from afina.core.settings import Settings
        from afina.gateway.app import create_app

        runtime = Runtime(Settings())
        app = create_app(runtime)
        with runtime.db.session() as session:
            key = repo.create_api_key(session, "bench")
        body = json.dumps(BODIES[args.path](args.stream)).encode()
        route = json.dumps({"targets": [{"model": overhead.UPSTREAM_MODEL, "upstream": "up"}]}).encode()

        async def run() -> dict[str, Any]:
            status, answer = await call(app, "PUT", f"/v1/routes/{overhead.ROUTE}", key, route)
            if status != 200:
                raise RuntimeError(f"PUT /v1/routes/{overhead.ROUTE} answered {status}: {answer[:300]!r}")
            await drive(app, args.path, key, body, 300)  # warm-up: pools, caches, series
            cpu_us: list[float] = []
            for _ in range(args.rounds):
                started = time.process_time()
                await drive(app, args.path, key, body, args.requests)
                cpu_us.append((time.process_time() - started) / args.requests * 1e6)
            profiler = cProfile.Profile()
            profiler.enable()
            await drive(app, args.path, key, body, args.requests)
            profiler.disable()
            return {"cpu_us": cpu_us, "profiler": profiler}

        result = asyncio.run(run())
    finally:
        overhead.stop(upstream)
    stats = pstats.Stats(result["profiler"])
    calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    print(f"path {args.path}{' (stream)' if args.stream else ''}; load average {overhead.loadavg()}")
    print(f"CPU per request without the profiler, {args.rounds} rounds of {args.requests}: "
          f"best {min(result['cpu_us']):.0f} µs, all {[round(value) for value in result['cpu_us']]}")
    print(f"Python function calls per request (cProfile): {calls / args.requests:.0f}")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(result["profiler"], stream=text).strip_dirs().sort_stats(order).print_stats(args.top)
        print(text.getvalue())
    if args.out:
        stats.dump_stats(str(args.out))


if __name__ == "__main__":
    main()
