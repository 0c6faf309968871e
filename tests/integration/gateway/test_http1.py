"""``Http1Client`` against real servers on loopback: uvicorn for an ordinary HTTP/1.1 server, and a raw
``asyncio.start_server`` that writes exact bytes where a test needs the framing (or the misbehaviour) precise.

Each test runs its own event loop (``asyncio.run``), its raw server on that same loop.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop

from afina.gateway.inference.http1 import (
    STREAM_BUFFER_BYTES,
    ConnectFailed,
    ConnectionClosed,
    Http1Client,
    ProtocolError,
    ReadTimeout,
)
from tests.support.servers import ServedApp, free_port, serve_app

T = TypeVar("T")
Handler = Callable[["Raw", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop,
                                                            "uvloop": uvloop.new_event_loop}
loop_factory = asyncio.new_event_loop


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test on asyncio's loop and on uvloop's (the gateway's, under uvicorn[standard])."""
    global loop_factory
    loop_factory = LOOPS[request.param]
    yield
    loop_factory = asyncio.new_event_loop


def run(coroutine: Awaitable[T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)  # type: ignore[arg-type]


def client(url: str, **options: Any) -> Http1Client:
    return Http1Client(url, **{"connect_timeout_s": 2, "read_timeout_s": 5, **options})


# --- a raw server ------------------------------------------------------------------------------------------


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    body: bytes

    @property
    def method(self) -> str:
        return self.line.split(" ")[0]

    @property
    def path(self) -> str:
        return self.line.split(" ")[1]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the connection; ``None`` when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *rest = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (item.partition(":") for item in rest if item)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return Request(line, headers, body)


def answer(status: int = 200, body: bytes = b"", *headers: str, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *headers] + ([f"Content-Length: {len(body)}"] if length else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


@dataclass
class Raw:
    """A raw HTTP server on this loop: ``handler`` serves each accepted connection; it counts connections (all,
    and open at once) and the requests it read."""

    handler: Handler
    port: int = 0
    accepted: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[Request] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Raw:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            self.open_now -= 1
            self.disconnected.set()
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> Request | None:
        request = await read_request(reader)
        if request is not None:
            self.requests.append(request)
        return request


def serving(respond: Callable[[Request], bytes | list[bytes]], pause_s: float = 0.0) -> Handler:
    """A keep-alive handler answering each request with ``respond``'s bytes (a list: written apart, pausing)."""

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.next_request(reader)) is not None:
            out = respond(request)
            for piece in out if isinstance(out, list) else [out]:
                writer.write(piece)
                await writer.drain()
                if pause_s:
                    await asyncio.sleep(pause_s)
    return handler


# --- an ordinary server: uvicorn -------------------------------------------------------------------------------


@dataclass
class EchoApp:
    ports: set[int] = field(default_factory=set)  # the client's ports seen: one per connection
    seen: list[dict[str, str]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.ports.add(scope["client"][1])
        self.seen.append({name.decode(): value.decode() for name, value in scope["headers"]})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/chunked":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for piece in (b"one\n", b"tw", b"o\r\nthree", b"\n"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body) + 5).encode())]})
        await send({"type": "http.response.body", "body": b"echo:" + body})


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[EchoApp, ServedApp]]:
    app = EchoApp()
    served = serve_app(app)
    yield app, served
    served.stop()


def test_sequential_requests_share_one_keep_alive_connection(echo: tuple[EchoApp, ServedApp]) -> None:
    app, served = echo
    app.ports.clear()
    http = client(f"{served.url}/base/", headers={"Authorization": "Bearer sk-secret"})

    async def calls() -> list[Any]:
        try:
            return [await http.request("POST", "/x", b"n%d" % index, {"Content-Type": "application/json"})
                    for index in range(5)]
        finally:
            await http.close()

    responses = run(calls())
    assert [(r.status, r.body) for r in responses] == [(200, b"echo:n%d" % index) for index in range(5)]
    assert responses[0].headers["content-length"] == "7"
    assert len(app.ports) == 1  # one connection carried all five
    headers = app.seen[-1]
    assert headers["host"] == f"127.0.0.1:{served.port}" and headers["authorization"] == "Bearer sk-secret"
    assert headers["content-type"] == "application/json" and headers["content-length"] == "2"
    assert "accept-encoding" not in headers  # no compression asked


def test_a_chunked_stream_is_read_line_by_line(echo: tuple[EchoApp, ServedApp]) -> None:
    app, served = echo
    http = client(served.url)

    async def read() -> tuple[list[bytes], bytes]:
        try:
            async with await http.stream("GET", "/chunked") as response:
                lines = [line async for line in response.lines()]
            whole = await http.request("GET", "/chunked")
            return lines, whole.body
        finally:
            await http.close()

    lines, whole = run(read())
    assert lines == [b"one\n", b"two\r\n", b"three\n"] and whole == b"one\ntwo\r\nthree\n"


# --- framing ----------------------------------------------------------------------------------------------


def test_content_length_chunked_and_until_close_bodies() -> None:
    def respond(request: Request) -> bytes | list[bytes]:
        if request.path == "/length":
            return answer(200, b"hello")
        if request.path == "/chunked":
            return [answer(200, b"", "Transfer-Encoding: chunked", length=False) + b"5\r\nhel",
                    b"lo\r\n6\r\n world\r\n", b"0\r\n\r\n"]
        return [answer(200, b"", "Connection: close", length=False) + b"until ", b"the end"]

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.next_request(reader)) is not None:
            out = respond(request)
            for piece in out if isinstance(out, list) else [out]:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
            if request.path == "/close":
                return  # the body ends when the connection does

    async def calls() -> None:
        async with Raw(handler) as raw:
            http = client(raw.url)
            assert (await http.request("GET", "/length")).body == b"hello"
            assert (await http.request("GET", "/chunked")).body == b"hello world"
            assert (await http.request("GET", "/close")).body == b"until the end"
            assert (await http.request("GET", "/length")).body == b"hello"
            assert raw.accepted == 2  # the read-until-close answer took its connection with it
            await http.close()

    run(calls())


def test_connection_close_and_http_1_0_answers_are_not_reused() -> None:
    def respond(request: Request) -> bytes:
        if request.path == "/close":
            return answer(200, b"a", "Connection: close")
        if request.path == "/old":
            return answer(200, b"b").replace(b"HTTP/1.1", b"HTTP/1.0")
        return answer(200, b"c")

    async def calls() -> None:
        async with Raw(serving(respond)) as raw:
            http = client(raw.url)
            for path in ("/close", "/old", "/keep", "/keep"):
                await http.request("GET", path)
            assert raw.accepted == 3 and len(raw.requests) == 4
            await http.close()

    run(calls())


def test_head_and_204_answers_have_no_body_and_keep_the_connection() -> None:
    def respond(request: Request) -> bytes:
        if request.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"  # the length a GET would have: no body follows
        if request.path == "/none":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return answer(200, b"after")

    async def calls() -> None:
        async with Raw(serving(respond)) as raw:
            http = client(raw.url)
            head = await http.request("HEAD", "/thing")
            assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "10")
            none = await http.request("DELETE", "/none")
            assert (none.status, none.body) == (204, b"")
            assert (await http.request("GET", "/x")).body == b"after"
            assert raw.accepted == 1
            assert "content-length" not in raw.requests[0].headers  # no body, no length, on a GET/HEAD
            await http.close()

    run(calls())


def test_compressed_answers_are_decoded() -> None:
    text = b"words " * 1000
    packed = gzip.compress(text)

    def respond(request: Request) -> bytes:
        if request.path == "/gzip":
            return answer(200, packed, "Content-Encoding: gzip")
        if request.path == "/gzip-chunked":
            return (answer(200, b"", "Content-Encoding: gzip", "Transfer-Encoding: chunked", length=False)
                    + chunked(packed[:100], packed[100:]))
        if request.path == "/deflate-raw":
            squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            return answer(200, squeeze.compress(text) + squeeze.flush(), "Content-Encoding: deflate")
        return answer(200, zlib.compress(text), "Content-Encoding: deflate")

    async def calls() -> list[bytes]:
        async with Raw(serving(respond)) as raw:
            http = client(raw.url)
            bodies = [(await http.request("GET", path)).body
                      for path in ("/gzip", "/gzip-chunked", "/deflate", "/deflate-raw")]
            await http.close()
            return bodies

    assert run(calls()) == [text] * 4


# --- streams ----------------------------------------------------------------------------------------------


def test_stream_lines_across_arbitrary_chunk_boundaries() -> None:
    body = b"data: one\r\n\r\ndata: t" + b"w" * 300 + b"o\n\ndata: [DONE]\n\ntail"
    cuts = [1, 7, 8, 11, 12, 13, 20, 200, 330, len(body) - 2]
    pieces = [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True)]

    def respond(request: Request) -> list[bytes]:
        return [answer(200, b"", "Transfer-Encoding: chunked", length=False),
                *(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces), b"0\r\n\r\n"]

    async def calls() -> list[bytes]:
        async with Raw(serving(respond, pause_s=0.002)) as raw:
            http = client(raw.url)
            response = await http.stream("POST", "/events", b"{}")
            lines = [line async for line in response.lines()]
            await response.aclose()
            await http.request("POST", "/events", b"{}")
            assert raw.accepted == 1  # read to its end: the stream's connection went back to the pool
            await http.close()
            return lines

    assert run(calls()) == [b"data: one\r\n", b"\r\n", b"data: t" + b"w" * 300 + b"o\n", b"\n", b"data: [DONE]\n",
                            b"\n", b"tail"]


def test_a_line_over_the_limit_is_a_protocol_error() -> None:
    def respond(request: Request) -> list[bytes]:
        return [answer(200, b"", "Transfer-Encoding: chunked", length=False), chunked(b"short\n", b"x" * 60,
                                                                                      b"y" * 60 + b"\n")]

    async def calls() -> None:
        async with Raw(serving(respond)) as raw:
            http = client(raw.url, max_line_bytes=100)
            async with await http.stream("GET", "/") as response:
                lines = response.lines()
                assert await anext(lines) == b"short\n"
                with pytest.raises(ProtocolError, match="longer than 100 bytes"):
                    await anext(lines)
            await http.close()

    run(calls())


def test_closing_a_stream_early_closes_its_connection() -> None:
    async def drip(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.next_request(reader)) is not None:
            if request.path == "/quick":
                writer.write(answer(200, b"ok"))
                continue
            writer.write(answer(200, b"", "Transfer-Encoding: chunked", length=False))
            while True:  # until the client leaves
                writer.write(chunked(b"tick\n")[:-5])
                await writer.drain()
                await asyncio.sleep(0.01)

    async def calls() -> None:
        async with Raw(drip) as raw:
            http = client(raw.url)
            response = await http.stream("GET", "/drip")
            assert await anext(response.lines()) == b"tick\n"
            left_at = time.monotonic()
            await response.aclose()
            await asyncio.wait_for(raw.disconnected.wait(), 2)
            assert time.monotonic() - left_at < 1.5  # at once (the server would drip forever), with room on a busy box
            assert (await http.request("GET", "/quick")).body == b"ok"
            assert raw.accepted == 2  # the left stream's connection was not reused
            await http.close()

    run(calls())


def test_a_stream_not_read_pauses_the_socket_and_loses_nothing() -> None:
    big = bytes(range(256)) * (4 * STREAM_BUFFER_BYTES // 256)

    async def calls() -> None:
        async with Raw(serving(lambda request: answer(200, big))) as raw:
            http = client(raw.url)
            async with await http.stream("GET", "/big") as response:
                await asyncio.sleep(0.3)
                connection = response._connection
                assert connection is not None and connection._paused
                assert connection.buffered < 2 * STREAM_BUFFER_BYTES  # not the whole 4 MiB
                assert await response.read() == big
            await http.close()

    run(calls())


# --- the pool ---------------------------------------------------------------------------------------------


def test_max_connections_holds_under_concurrency() -> None:
    async def slow(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.next_request(reader)) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer(200, request.path.encode()))

    async def calls() -> None:
        async with Raw(slow) as raw:
            http = client(raw.url, max_connections=2)
            bodies = await asyncio.gather(*(http.request("GET", f"/{index}") for index in range(5)))
            assert sorted(response.body for response in bodies) == [b"/%d" % index for index in range(5)]
            assert raw.most_open <= 2 and raw.accepted == 2
            await http.close()

    run(calls())


def test_callers_cancelled_anywhere_give_their_slots_back() -> None:
    """The gateway cancels a proxied call whose caller left: waiting for a slot, waiting for the answer, or in the
    middle of a stream. Each must give its slot back (a leaked one would, a hundred calls later, stall every call
    to that upstream), and a call cancelled mid-answer must close its connection (the upstream stops)."""
    async def slow(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.next_request(reader)) is not None:
            if request.path == "/drip":
                writer.write(answer(200, b"", "Transfer-Encoding: chunked", length=False))
                while True:
                    writer.write(b"5\r\ntick\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            writer.write(answer(200, request.path.encode()))

    async def streamed(http: Http1Client) -> None:
        async with await http.stream("GET", "/drip") as response:
            async for _ in response.lines():
                pass

    async def calls() -> None:
        async with Raw(slow) as raw:
            http = client(raw.url, max_connections=2)
            for round_ in range(6):  # many more cancellations than slots
                tasks = [asyncio.create_task(http.request("GET", f"/{round_}-{index}")) for index in range(4)]
                tasks.append(asyncio.create_task(streamed(http)))
                await asyncio.sleep(0.05 * (round_ % 3))  # before any slot is given, mid-answer, mid-stream
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                assert http._open <= 2  # the pool's own count (the server notices a closed socket later)
            # with a slot leaked these would wait forever: both slots are free, and the calls go through them
            answers = await asyncio.wait_for(
                asyncio.gather(*(http.request("GET", f"/after-{index}") for index in range(4))), 5)
            assert sorted(response.body for response in answers) == [b"/after-%d" % index for index in range(4)]
            assert raw.disconnected.is_set()  # the calls cancelled mid-answer closed their connections
            await http.close()

    run(calls())


def test_a_reused_connection_the_server_closed_is_retried_once_on_a_fresh_one() -> None:
    """The keep-alive race: the server closes a connection it kept idle just as the next request goes out."""

    async def one_per_connection(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await raw.next_request(reader) is None:
            return
        writer.write(answer(200, b"first" if raw.accepted == 1 else b"again"))
        await writer.drain()
        await reader.read(1)  # the next request starts arriving: close without reading or answering it

    async def calls() -> None:
        async with Raw(one_per_connection) as raw:
            http = client(raw.url)
            assert (await http.request("POST", "/a", b"1")).body == b"first"
            assert (await http.request("POST", "/b", b"2")).body == b"again"
            assert [request.path for request in raw.requests] == ["/a", "/b"]  # /b was read once, answered once
            assert raw.accepted == 2
            await http.close()

    run(calls())


def test_a_fresh_connection_closed_without_an_answer_is_not_retried() -> None:
    async def hang_up(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.next_request(reader)

    async def calls() -> None:
        async with Raw(hang_up) as raw:
            http = client(raw.url)
            with pytest.raises(ConnectionClosed):
                await http.request("POST", "/once", b"{}")
            with pytest.raises(ConnectionClosed):
                await http.stream("POST", "/once", b"{}")
            assert len(raw.requests) == 2 and raw.accepted == 2
            await http.close()

    run(calls())


def test_an_idle_connection_the_server_closed_is_dropped_from_the_pool() -> None:
    async def once(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.next_request(reader)
        writer.write(answer(200, b"ok"))  # keep-alive promised, then closed at once

    async def calls() -> None:
        async with Raw(once) as raw:
            http = client(raw.url)
            await http.request("GET", "/")
            await asyncio.sleep(0.1)
            assert http._idle == [] and http._open == 0
            await http.request("GET", "/")
            assert raw.accepted == 2 and len(raw.requests) == 2
            await http.close()

    run(calls())


def test_close_closes_everything_and_the_client_reopens_on_use() -> None:
    async def calls() -> None:
        async with Raw(serving(lambda request: answer(200, b"ok"))) as raw:
            http = client(raw.url)
            await http.request("GET", "/")
            await http.close()
            await asyncio.wait_for(raw.disconnected.wait(), 2)
            assert (await http.request("GET", "/")).body == b"ok"
            assert raw.accepted == 2
            await http.close()

    run(calls())


def test_a_client_used_from_a_second_event_loop_starts_afresh(echo: tuple[EchoApp, ServedApp]) -> None:
    app, served = echo
    app.ports.clear()
    http = client(served.url)
    assert run(http.request("POST", "/", b"1")).body == b"echo:1"  # its idle connection outlives the loop
    assert run(http.request("POST", "/", b"2")).body == b"echo:2"
    run(http.close())
    assert len(app.ports) == 2


# --- failures ---------------------------------------------------------------------------------------------


def test_a_refused_connection_is_connect_failed() -> None:
    with pytest.raises(ConnectFailed, match="cannot connect"):
        run(client(f"http://127.0.0.1:{free_port()}").request("GET", "/"))


def test_silence_is_a_read_timeout_within_about_the_timeout() -> None:
    async def silent(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.next_request(reader)
        await reader.read()  # never answers

    async def timed(call: Callable[[Http1Client], Awaitable[Any]], **options: Any) -> float:
        async with Raw(silent) as raw:
            http = client(raw.url, **options)
            started = time.monotonic()
            with pytest.raises(ReadTimeout) as caught:
                await call(http)
            assert isinstance(caught.value, TimeoutError)
            await http.close()
            return time.monotonic() - started

    # the loop's timers have millisecond resolution (uvloop rounds them): a margin below, and room above on a busy box
    assert 0.28 <= run(timed(lambda http: http.request("GET", "/"), read_timeout_s=0.3)) < 2
    assert 0.28 <= run(timed(lambda http: http.stream("GET", "/"), read_timeout_s=0.3)) < 2
    assert 0.18 <= run(timed(lambda http: http.request("GET", "/", timeout_s=0.2))) < 2  # the whole call's bound


def test_a_stream_that_stalls_between_chunks_times_out() -> None:
    async def stall(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.next_request(reader)
        writer.write(answer(200, b"", "Transfer-Encoding: chunked", length=False) + b"6\r\nfirst\n\r\n")
        await reader.read()

    async def calls() -> None:
        async with Raw(stall) as raw:
            http = client(raw.url, read_timeout_s=0.2)
            async with await http.stream("GET", "/") as response:
                lines = response.lines()
                assert await anext(lines) == b"first\n"
                with pytest.raises(ReadTimeout):
                    await anext(lines)
            await http.close()

    run(calls())


def test_malformed_answers_are_protocol_errors() -> None:
    async def calls() -> None:
        async with Raw(serving(lambda request: b"NONSENSE\r\n\r\n")) as raw:
            with pytest.raises(ProtocolError):
                await client(raw.url).request("GET", "/")
        async with Raw(serving(lambda request: answer(200, b"x", "Content-Encoding: br"))) as raw:
            with pytest.raises(ProtocolError, match="Content-Encoding"):
                await client(raw.url).request("GET", "/")

    run(calls())


def test_headers_that_would_forge_a_line_are_refused() -> None:
    with pytest.raises(ValueError):
        client("http://127.0.0.1:1", headers={"X-Evil": "a\r\nInjected: 1"})
    with pytest.raises(ValueError):
        run(client("http://127.0.0.1:1").request("GET", "/", headers={"X": "b\nc"}))


def test_tls_is_asked_of_an_https_origin() -> None:
    """No certificate tooling here (trustme is not installed): a TLS client meeting a plain-HTTP server fails its
    handshake as ``ConnectFailed``, which shows TLS was spoken; the origin keeps its default port implicit."""
    assert client("https://example.com/v1").origin == "https://example.com"

    async def not_tls(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello
        writer.write(answer(400, b"plain HTTP here"))

    async def calls() -> None:
        async with Raw(not_tls) as raw:
            http = client(f"https://127.0.0.1:{raw.port}")
            assert http.tls and http.port == raw.port
            with pytest.raises(ConnectFailed):
                await http.request("GET", "/")

    run(calls())


def test_a_body_read_until_close_that_stalls_is_a_timeout_not_a_short_answer() -> None:
    async def stall(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.next_request(reader)
        writer.write(answer(200, b"", "Connection: close", length=False) + b"partial")
        await reader.read()

    async def calls() -> None:
        async with Raw(stall) as raw:
            with pytest.raises(ReadTimeout):
                await client(raw.url, read_timeout_s=0.2).request("GET", "/")

    run(calls())


def test_a_stream_left_at_its_last_event_is_drained_back_to_the_pool() -> None:
    """OpenAIUpstream stops reading at ``[DONE]``; the body's end, a packet later, is drained, not lost."""

    def respond(request: Request) -> list[bytes]:
        return [answer(200, b"", "Transfer-Encoding: chunked", length=False) + b"e\r\ndata: [DONE]\n\n\r\n",
                b"0\r\n\r\n"]

    async def calls() -> None:
        async with Raw(serving(respond, pause_s=0.05)) as raw:
            http = client(raw.url)
            for _ in range(2):
                response = await http.stream("POST", "/events", b"{}")
                async for line in response.lines():
                    if line.startswith(b"data: [DONE]"):
                        break
                assert await response.drain(1.0)
                await response.aclose()
            assert raw.accepted == 1
            await http.close()

    run(calls())
