"""A pooled HTTP/1.1 client on asyncio protocols and ``httptools``: the wire under ``OpenAIUpstream``.

Why it exists: every proxied request crosses it. Measured on the gateway's machine (uvloop, an instant local
upstream, one keep-alive connection, a small non-streamed JSON POST), aiohttp's client cost ~150 µs of CPU per
request and a bare ``asyncio.Protocol`` + ``httptools.HttpResponseParser`` exchange ~41 µs, while the gateway's
whole CPU per proxied request was ~390 µs: the client was the largest single cost. This module is that bare
exchange made whole: a pool, timeouts, every body framing, streams with backpressure, and clear errors.

What it does: HTTP/1.1 over TCP or TLS to one origin (``base_url``, whose path is a prefix of every request's);
keep-alive connections reused last-in first-out, at most ``max_connections`` open (further callers wait, first
come first served); bodies framed by Content-Length, chunked (httptools decodes the chunks) or the connection's
end; a gzip/deflate answer decoded (none is asked for: no ``Accept-Encoding`` goes out); a connect timeout and a
read timeout on each wait for bytes; one retry of a request whose reused connection the server had closed.

What it does not: pipelining, HTTP/2, proxies, redirects, cookies, ``Expect: 100-continue``, upgrades, request
bodies streamed in pieces (a body is ``bytes``), or any other origin than ``base_url``'s. It binds to the event
loop of its first use and is not thread-safe; used from another loop (tests running ``asyncio.run`` twice), it
drops the connections the old loop opened and starts afresh.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

STREAM_BUFFER_BYTES = 2**20  # a stream's unread body past this pauses reading from the socket
NO_BODY_STATUSES = frozenset({204, 304})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body still says ``Content-Length: 0``
LARGE_BODY_BYTES = 2**16  # a body at least this long is written apart from the head, not copied onto it
JSON_HEADERS = {"Content-Type": "application/json"}  # what the backends' JSON bodies go with
# after a stream's last event ([DONE], Ollama's done line), how long the body's end may take to come: read to it,
# the connection goes back to the pool; past it, the connection is closed
DRAIN_AFTER_LAST_S = 1.0
MAX_CONNECTIONS = 100  # per client, i.e. per upstream (each model's own limit is the serving layer's)


class TransportError(Exception):
    """The exchange failed below HTTP's semantics: no connection, a broken answer, a timeout. Messages name the
    origin and what happened, never a header's value (one carries the API key)."""


class ConnectFailed(TransportError):
    """No connection could be opened (refused, unreachable, a TLS handshake refused)."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """No connection was opened within ``connect_timeout_s``."""


class ProtocolError(TransportError):
    """The answer broke HTTP/1.1 (unparsable, an unknown encoding, a stream line over ``max_line_bytes``)."""


class ConnectionClosed(TransportError):
    """The connection closed (or was reset) before the answer ended."""


class ReadTimeout(TransportError, TimeoutError):
    """No byte arrived within ``read_timeout_s`` (or the whole call outlived its ``timeout_s``)."""


@dataclass(frozen=True, slots=True)
class Response:
    """A whole answer. ``headers`` has lower-case names; a repeated header's values are joined with ``, ``."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Decoder:
    """``Content-Encoding: gzip`` or ``deflate`` undone with zlib (deflate as zlib-wrapped, or raw when the
    first bytes are not a zlib header: both are seen in the wild)."""

    def __init__(self, encoding: str) -> None:
        self._raw_fallback = encoding == "deflate"
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # 32: a gzip or zlib header, detected

    def decode(self, data: bytes) -> bytes:
        try:
            out = self._inflate.decompress(data)
        except zlib.error:
            if not self._raw_fallback:
                raise
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._inflate.decompress(data)
        self._raw_fallback = False
        return out

    def flush(self) -> bytes:
        return self._inflate.flush()


def _decoder(encoding: str | None) -> _Decoder | None:
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return None
    name = encoding.strip().lower()
    if name in ("gzip", "x-gzip", "deflate"):
        return _Decoder("deflate" if name == "deflate" else "gzip")
    raise ProtocolError(f"unsupported Content-Encoding {name[:40]!r}")


class _Connection(asyncio.Protocol):
    """One socket and its parser, carrying one exchange at a time. The caller waits on ``_waiter`` (one future
    per wait, woken by the parser's callbacks); the read timeout is one ``call_later`` per wait, re-armed
    rather than rescheduled when bytes keep arriving (``_last_data``), so a request costs no task and no timer
    churn."""

    def __init__(self, client: Http1Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.generation = client._generation
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False  # connection_lost fired, or we closed it
        self.idle = False  # in the pool, unused
        self.reused = False  # has carried an exchange before this one
        self.busy = False  # an exchange is under way (bytes at any other time are a broken server)
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._paused = False
        self._reset_exchange(head_only=False, streaming=False)

    def _reset_exchange(self, *, head_only: bool, streaming: bool) -> None:
        self.head_only = head_only
        self.streaming = streaming  # body bytes wake the waiter (a stream reads them as they come)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received_any = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # no length, not chunked: the body ends with the connection
        self.error: TransportError | None = None
        self.decoder: _Decoder | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # an answer nobody asked for: the connection cannot be trusted again
            self._close()
            return
        self.received_any = True
        self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, TransportError) else None
            self._fail(cause or ProtocolError(f"{self.client.origin} answered a body that cannot be decoded"))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ProtocolError(f"{self.client.origin} answered malformed HTTP: {str(exc)[:200]}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost finishes the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.idle:
            self.client._lost_idle(self)
            return
        if not self.busy or self.complete or self.error is not None:
            return  # nothing under way, or it already ended (a timeout closes the connection itself)
        if self.headers_done and self.until_close and exc is None:
            self._finish_body()  # read until close: the close is the body's end
            return
        reason = f": {type(exc).__name__}" if exc is not None else ""
        self._fail(ConnectionClosed(f"{self.client.origin} closed the connection before the answer ended{reason}"))

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: not trusted with another request
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self.headers.get(key)
        self.headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.headers = {}
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        headers = self.headers
        self.until_close = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
        self.decoder = _decoder(headers.get("content-encoding"))
        self.headers_done = True
        if self.head_only or status in NO_BODY_STATUSES:
            self.until_close = False
            if self.head_only:  # httptools cannot be told a HEAD answer has no body: finish it here
                self.parser = httptools.HttpResponseParser(self)
                self._finish_body()
                return
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if self.decoder is not None:
            body = self.decoder.decode(body)
        self.chunks.append(body)
        if self.streaming:
            self.buffered += len(body)
            if self.buffered > STREAM_BUFFER_BYTES and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done or self.complete:
            return  # the end of an interim answer, or of a HEAD answer already finished
        self._finish_body()

    # --- the exchange ----------------------------------------------------------------------------

    def _finish_body(self) -> None:
        if self.decoder is not None:
            tail = self.decoder.flush()
            if tail:
                self.chunks.append(tail)
                self.buffered += len(tail)
        self.complete = True
        self._wake()

    def _fail(self, error: TransportError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, data: bytes, body: bytes | None, *, head_only: bool, streaming: bool) -> None:
        self._reset_exchange(head_only=head_only, streaming=streaming)
        self.busy = True
        if self.closed or self.transport is None or self.transport.is_closing():
            self.error = ConnectionClosed(f"{self.client.origin} closed the connection before the request went")
            return
        if body and len(body) >= LARGE_BODY_BYTES:
            self.transport.write(data)
            self.transport.write(body)
        else:
            self.transport.write(data + body if body else data)

    async def wait(self) -> None:
        """Until the parser wakes us, or ``read_timeout_s`` passes with no byte (then the exchange fails)."""
        waiter = self.loop.create_future()
        self._waiter = waiter
        self._last_data = self.loop.time()
        self._timer = self.loop.call_later(self.client.read_timeout_s, self._check_timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            self._cancel_timer()

    def _check_timeout(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return
        quiet = self.loop.time() - self._last_data
        left = self.client.read_timeout_s - quiet
        if left > 0.001:  # bytes came meanwhile: wait out the rest from the last of them
            self._timer = self.loop.call_later(left, self._check_timeout)
            return
        self._fail(ReadTimeout(f"{self.client.origin} sent nothing for {self.client.read_timeout_s:g}s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def until_headers(self) -> None:
        while not self.headers_done and self.error is None:
            await self.wait()
        if self.error is not None and not self.headers_done:
            raise self.error

    async def until_complete(self) -> None:
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self.wait()

    def take(self) -> bytes:
        """The body bytes received and not yet taken (reading resumes if it was paused for them)."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return (self.complete and self.error is None and self.keep_alive and not self.closed
                and not self.until_close)

    @property
    def retryable(self) -> bool:
        """A reused connection that closed before any byte of an answer: the server's keep-alive race."""
        return self.reused and not self.received_any and isinstance(self.error, ConnectionClosed)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class StreamResponse:
    """An answer whose status and headers have arrived and whose body is read as it comes.

    ``aclose`` (or leaving ``async with``) gives the connection back to the pool when the body was read to its
    end, and closes it otherwise: closing is how the server learns the reader left (and stops generating)."""

    def __init__(self, client: Http1Client, connection: _Connection, max_line_bytes: int) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self._max_line_bytes = max_line_bytes
        self.status = connection.status
        self.headers = connection.headers

    async def __aenter__(self) -> StreamResponse:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes in the pieces they arrived in (decoded when the answer was compressed)."""
        while (data := await self._next()) is not None:
            yield data

    async def _next(self) -> bytes | None:
        """The next body bytes, ``None`` at the end; waits at most ``read_timeout_s`` for each."""
        connection = self._connection
        if connection is None:
            raise ConnectionClosed("the stream was closed")
        while True:
            if connection.chunks:
                return connection.take()
            if connection.complete:
                return None
            if connection.error is not None:
                raise connection.error
            await connection.wait()

    async def lines(self) -> AsyncIterator[bytes]:
        """Each line of the body with its ``\\n`` (``\\r\\n`` kept as sent); a last line without one is yielded
        as is. A line longer than ``max_line_bytes`` is a ``ProtocolError``."""
        limit = self._max_line_bytes
        parts: list[bytes] = []
        size = 0
        while (data := await self._next()) is not None:
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                if size + end + 1 - start > limit:
                    raise ProtocolError(f"a line of the answer is longer than {limit} bytes")
                if parts:
                    parts.append(data[start:end + 1])
                    line = b"".join(parts)
                    parts, size = [], 0
                else:
                    line = data[start:end + 1]
                yield line
                start = end + 1
            if start < len(data):
                parts.append(data[start:] if start else data)
                size += len(data) - start
                if size > limit:
                    raise ProtocolError(f"a line of the answer is longer than {limit} bytes")
        if parts:
            yield b"".join(parts)

    async def read(self) -> bytes:
        """The rest of the body (an error answer's words)."""
        pieces = []
        while (data := await self._next()) is not None:
            pieces.append(data)
        return b"".join(pieces)

    async def drain(self, timeout_s: float) -> bool:
        """Read and drop the rest of the body for at most ``timeout_s``; whether it ended (the connection is then
        fit for the pool). A server that sent its last event is usually a packet away from the body's end."""
        connection = self._connection
        if connection is None or connection.complete:
            return connection is not None and connection.error is None
        try:
            async with asyncio.timeout(timeout_s):
                while await self._next() is not None:
                    pass
        except (TransportError, TimeoutError):
            return False
        return True

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client._release(connection)


class Http1Client:
    """Requests to one origin over a pool of keep-alive connections (see the module's docstring).

    ``headers`` go with every request (an ``Authorization``), after ``Host``; a request's own ``headers`` follow
    them. ``read_timeout_s`` bounds each wait for bytes, ``connect_timeout_s`` each connection's opening."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None, connect_timeout_s: float,
                 read_timeout_s: float, max_connections: int = MAX_CONNECTIONS, max_line_bytes: int = 2**20) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        shown_host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        self.origin = f"{parts.scheme}://{shown_host}" + ("" if default_port else f":{self.port}")
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max(1, max_connections)
        self.max_line_bytes = max_line_bytes
        host_header = shown_host if default_port else f"{shown_host}:{self.port}"
        self._fixed_head = (f"Host: {host_header}\r\n" + _header_lines(headers or {})).encode("latin-1")
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._open = 0  # connections open or opening: at most ``max_connections``
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._generation = 0  # bumped by ``close``: connections of an older one are not taken back

    def __repr__(self) -> str:
        return f"Http1Client({self.origin}{self.prefix})"

    # --- requests --------------------------------------------------------------------------------

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, *, timeout_s: float | None = None) -> Response:
        """The whole answer to one request. ``timeout_s`` bounds the whole call, connecting included."""
        if timeout_s is None:
            return await self._request(method, path, body, headers)
        try:
            async with asyncio.timeout(timeout_s) as scope:
                return await self._request(method, path, body, headers)
        except TimeoutError as exc:
            if scope.expired() and not isinstance(exc, TransportError):
                raise ReadTimeout(f"{self.origin}{path} did not answer within {timeout_s:g}s") from None
            raise

    async def _request(self, method: str, path: str, body: bytes | None,
                       headers: Mapping[str, str] | None) -> Response:
        connection = await self._exchange(method, path, body, headers, streaming=False)
        try:
            await connection.until_complete()
        except BaseException:
            self._discard(connection)
            raise
        chunks = connection.chunks
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        response = Response(connection.status, connection.headers, content)
        self._release(connection)
        return response

    async def stream(self, method: str, path: str, body: bytes | None = None,
                     headers: Mapping[str, str] | None = None) -> StreamResponse:
        """The answer once its status and headers arrived; its body is read from the ``StreamResponse``."""
        connection = await self._exchange(method, path, body, headers, streaming=True)
        return StreamResponse(self, connection, self.max_line_bytes)

    async def _exchange(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None, *,
                        streaming: bool) -> _Connection:
        """Send the request and wait for what the caller needs first: the headers of a stream, or (so that the
        retry below covers it) the first byte of a whole answer.

        The one retry: a request on a connection reused from the pool that closed (or was reset) before any byte
        of an answer arrived goes once more, on a fresh connection. That is the server closing a connection it
        had kept idle just as we reused it (its keep-alive timeout), so it never read the request: sending it
        again cannot run it twice. Anything else (a fresh connection, a byte received) is not retried."""
        data = self._head(method, path, body, headers)
        head_only = method == "HEAD"
        connection = await self._acquire()
        for attempt in range(2):
            connection.send(data, body, head_only=head_only, streaming=streaming)
            try:
                await self._first_answer(connection, streaming)
                return connection
            except ConnectionClosed:
                if attempt or not connection.retryable:
                    self._discard(connection)
                    raise
            except BaseException:
                self._discard(connection)
                raise
            connection = await self._replace(connection)
        raise AssertionError("unreachable")

    @staticmethod
    async def _first_answer(connection: _Connection, streaming: bool) -> None:
        if streaming:
            await connection.until_headers()
            return
        while not connection.received_any and not connection.complete:
            if connection.error is not None:
                raise connection.error
            await connection.wait()

    def _head(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        target = self.prefix + path
        if not target.startswith("/") or any(char in target for char in " \r\n"):
            raise ValueError(f"not a request path: {target[:100]!r}")
        lines = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._fixed_head
        if headers:
            lines += _header_lines(headers).encode("latin-1")
        if body is not None or method in BODY_METHODS:
            lines += b"Content-Length: %d\r\n" % (len(body) if body else 0)
        return lines + b"\r\n"

    # --- the pool --------------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        """An idle connection (the most recently used), else a new one if fewer than ``max_connections`` are
        open, else the next one given back, in the order callers asked."""
        self._bind()
        while True:
            if not self._waiters:
                while self._idle:
                    connection = self._idle.pop()
                    connection.idle = False
                    if not connection.closed:
                        connection.reused = True
                        return connection
                    self._forget(connection)
                if self._open < self.max_connections:
                    self._open += 1
                    return await self._dial()
            handed = await self._wait_turn()
            if handed is None:
                return await self._dial()  # a slot was handed over: ``_open`` already counts it
            if not handed.closed:
                handed.reused = True
                return handed
            self._forget(handed)

    async def _wait_turn(self) -> _Connection | None:
        assert self._loop is not None
        turn: asyncio.Future[_Connection | None] = self._loop.create_future()
        self._waiters.append(turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed something just as we were cancelled: pass it on
                handed = turn.result()
                if handed is None:
                    self._free_slot()
                else:
                    self._release(handed)
            elif turn in self._waiters:  # (``close`` may have emptied the queue meanwhile)
                self._waiters.remove(turn)
            raise

    async def _dial(self) -> _Connection:
        """A new connection in a slot already counted; the slot is freed if it cannot be opened."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, loop), self.host, self.port, ssl=self._tls_context(),
                    server_hostname=self.host if self.tls else None)
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"cannot connect to {self.origin} within {self.connect_timeout_s:g}s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(f"cannot connect to {self.origin}: {exc}") from None
            raise
        self._all.add(connection)
        return connection

    async def _replace(self, connection: _Connection) -> _Connection:
        """A fresh connection in ``connection``'s slot (the retry must not queue behind others)."""
        connection._close()
        self._all.discard(connection)
        if connection.generation != self._generation:
            self._open += 1  # ``close`` ran meanwhile: take a slot afresh
        return await self._dial()

    def _release(self, connection: _Connection) -> None:
        """Back to the pool if its answer was read to the end and it may carry another; closed otherwise."""
        connection.busy = False
        if not connection.reusable or connection.generation != self._generation or connection.loop is not self._loop:
            self._discard(connection)
            return
        connection._cancel_timer()
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(connection)
                return
        connection.idle = True
        self._idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.busy = False
        connection.idle = False
        connection._close()
        self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        if connection in self._all:
            self._all.discard(connection)
            if connection.generation == self._generation:
                self._free_slot()

    def _lost_idle(self, connection: _Connection) -> None:
        """The server closed a connection resting in the pool."""
        connection.idle = False
        if connection in self._idle:
            self._idle.remove(connection)
        self._forget(connection)

    def _free_slot(self) -> None:
        """A slot is free: the first caller waiting takes it (to open a connection), else the count drops."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._open -= 1

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                self._drop_all()
            self._loop = loop

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    # --- closing ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection, idle or busy (a busy exchange fails with ``ConnectionClosed``); the client
        opens new ones if used again."""
        self._drop_all()

    def _drop_all(self) -> None:
        connections, self._all = self._all, set()
        self._idle.clear()
        waiters, self._waiters = self._waiters, deque()
        self._open = 0
        self._generation += 1
        for connection in connections:
            connection.idle = False
            try:
                connection._close()
            except RuntimeError:  # its loop is closed: the socket goes with it
                pass
        for turn in waiters:
            if not turn.done():
                try:
                    turn.set_exception(ConnectionClosed(f"the client for {self.origin} was closed"))
                except RuntimeError:
                    pass


def _header_lines(headers: Mapping[str, str]) -> str:
    """``Name: value\\r\\n`` for each header; a CR or LF in either is refused (it would forge a header)."""
    lines = []
    for name, value in headers.items():
        if any(char in name for char in ":\r\n") or "\r" in value or "\n" in value:
            raise ValueError(f"a header with a line break or colon in its name: {name[:40]!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


__all__ = ["ConnectFailed", "ConnectTimeout", "ConnectionClosed", "Http1Client", "ProtocolError", "ReadTimeout",
           "Response", "StreamResponse", "TransportError"]
