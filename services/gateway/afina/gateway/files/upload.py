"""Receiving a multipart upload as a stream, never whole in memory.

Starlette's form parser spools a file of any size to disk before the route runs,
so a size limit could only be checked afterwards. This reader parses
``multipart/form-data`` straight off the request stream instead: the file part is
fed to a checker (``UploadSniffer``) and a temp file as it arrives, and the upload
stops at ``max_bytes`` or at the first sign that it is no dataset afina reads. The
small fields around the file are bounded too: at most ``max_fields`` of them, each at
most ``max_field_bytes``, with part headers of at most ``MAX_PART_HEADER_BYTES``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
from fastapi import Request

from afina.core.errors import AfinaError, InvalidRequest, PayloadTooLarge

try:
    import python_multipart as multipart
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import parse_options_header
except ModuleNotFoundError:  # python-multipart < 0.0.13
    import multipart  # type: ignore[no-redef]
    from multipart.exceptions import MultipartParseError  # type: ignore[no-redef]
    from multipart.multipart import parse_options_header  # type: ignore[no-redef]

FLUSH_BYTES = 1024 * 1024
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file and the fields
MAX_PART_HEADER_BYTES = 16 * 1024  # a part's headers (its name, its file name, its type) together
DRAIN_BYTES = 16 * 1024 * 1024  # read (and drop) this much of a refused body so the client sees the answer


def upload_body_limit(max_bytes: int, max_fields: int, max_field_bytes: int) -> int:
    """The largest multipart body an upload within its limits can have: the file, the fields, the framing."""
    return max_bytes + max_fields * max_field_bytes + FORM_OVERHEAD_BYTES


class UploadChecker(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


@dataclass
class SpooledUpload:
    """An upload that passed its checks, waiting in a temp file to be stored."""

    path: Path
    filename: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class _FormReader:
    """Turns parser callbacks into field values and file bytes (see python-multipart's callbacks)."""

    def __init__(self, file_field: str, max_bytes: int, spool_dir: Path,
                 make_checker: Callable[[str], UploadChecker],
                 before_file: Callable[[dict[str, str]], None] | None, *, max_fields: int,
                 max_field_bytes: int) -> None:
        self.file_field = file_field
        self.before_file = before_file
        self.max_bytes = max_bytes
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.field_count = 0
        self._header_bytes = 0
        self.spool_dir = spool_dir
        self.make_checker = make_checker
        self.fields: dict[str, str] = {}
        self.events: list[tuple[str, bytes]] = []
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._field_value = bytearray()
        self.filename: str | None = None
        self.path: Path | None = None
        self.size = 0
        self._handle = None
        self._checker: UploadChecker | None = None
        self._pending = bytearray()
        self._in_file = False

    # python-multipart callbacks: collect, then handle outside the parser
    def callbacks(self) -> dict[str, Callable[..., None]]:
        def data_event(name: str) -> Callable[[bytes, int, int], None]:
            return lambda data, start, end: self.events.append((name, bytes(data[start:end])))

        def mark(name: str) -> Callable[[], None]:
            return lambda: self.events.append((name, b""))

        return {"on_part_begin": mark("part_begin"), "on_part_data": data_event("part_data"),
                "on_part_end": mark("part_end"), "on_header_field": data_event("header_field"),
                "on_header_value": data_event("header_value"), "on_header_end": mark("header_end"),
                "on_headers_finished": mark("headers_finished"), "on_end": mark("end")}

    async def handle_events(self) -> None:
        events, self.events = self.events, []
        for name, data in events:
            if name == "part_begin":
                self._headers, self._field_value, self._header_bytes = {}, bytearray(), 0
            elif name in ("header_field", "header_value"):
                self._header_bytes += len(data)
                if self._header_bytes > MAX_PART_HEADER_BYTES:
                    raise InvalidRequest(f"a part of the form has headers over {MAX_PART_HEADER_BYTES} bytes",
                                         param=self.file_field)
                if name == "header_field":
                    self._header_field += data
                else:
                    self._header_value += data
            elif name == "header_end":
                self._headers[self._header_field.lower()] = self._header_value
                self._header_field, self._header_value = b"", b""
            elif name == "headers_finished":
                await self._begin_part()
            elif name == "part_data":
                await self._part_data(data)
            elif name == "part_end":
                await self._end_part()

    async def _begin_part(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._in_file = False
            self.field_count += 1
            if self.field_count > self.max_fields:
                raise InvalidRequest(f"the form has more than {self.max_fields} fields besides the file",
                                     param=self._part_name or None)
            return
        if self._part_name != self.file_field or self.path is not None:
            raise InvalidRequest(f"send exactly one file, in the form field '{self.file_field}'",
                                 param=self.file_field)
        if self.before_file is not None:
            self.before_file(self.fields)
        raw_name = options[b"filename"].decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
        self.filename = raw_name[:255] or "upload.jsonl"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="upload-", suffix=".part")
        self.path = Path(name)
        self._handle = os.fdopen(fd, "wb")
        self._checker = self.make_checker(self.filename)
        self._in_file = True

    async def _part_data(self, data: bytes) -> None:
        if not self._in_file:
            self._field_value += data
            if len(self._field_value) > self.max_field_bytes:
                raise PayloadTooLarge(f"form field '{self._part_name}' is longer than the limit of "
                                      f"{self.max_field_bytes} bytes", param=self._part_name or None,
                                      code="form_field_too_large")
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"file is larger than the limit of {self.max_bytes} bytes", param=self.file_field)
        self._pending += data
        if len(self._pending) >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        chunk, self._pending = bytes(self._pending), bytearray()
        checker, handle = self._checker, self._handle
        assert checker is not None and handle is not None

        def check_and_write() -> None:
            checker.feed(chunk)  # checked first: a refused byte is never written
            handle.write(chunk)

        await anyio.to_thread.run_sync(check_and_write)

    async def _end_part(self) -> None:
        if self._in_file:
            await self._flush()
            assert self._checker is not None and self._handle is not None
            await anyio.to_thread.run_sync(self._checker.finish)
            self._handle.close()
            self._in_file = False
        elif self._part_name:
            self.fields[self._part_name] = self._field_value.decode("utf-8", "replace")

    def cleanup(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


async def receive_upload(request: Request, *, file_field: str, max_bytes: int, spool_dir: Path,
                         make_checker: Callable[[str], UploadChecker],
                         before_file: Callable[[dict[str, str]], None] | None = None, max_fields: int,
                         max_field_bytes: int) -> SpooledUpload:
    """Stream a ``multipart/form-data`` body into a checked temp file (the caller discards it).

    Raises ``PayloadTooLarge`` past ``max_bytes`` (or a field past ``max_field_bytes``),
    ``InvalidRequest`` past ``max_fields`` fields, and whatever the checker raises; in
    every case nothing is left on disk. ``before_file`` may refuse the form fields seen
    before the file part, so a wrong ``purpose`` stops the upload early.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise InvalidRequest("send the file as multipart/form-data", param=file_field)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > upload_body_limit(max_bytes, max_fields, max_field_bytes):
        raise PayloadTooLarge(f"file is larger than the limit of {max_bytes} bytes", param=file_field)
    reader = _FormReader(file_field, max_bytes, spool_dir, make_checker, before_file, max_fields=max_fields,
                         max_field_bytes=max_field_bytes)
    parser = multipart.MultipartParser(options[b"boundary"], reader.callbacks())
    stream = request.stream()
    try:
        async for chunk in stream:
            parser.write(chunk)
            await reader.handle_events()
        parser.finalize()
        await reader.handle_events()
    except BaseException as exc:
        reader.cleanup()
        if isinstance(exc, (AfinaError, MultipartParseError)):
            await _drain(stream)
        if isinstance(exc, MultipartParseError):
            raise InvalidRequest(f"malformed multipart body: {exc}", param=file_field) from None
        raise
    if reader.path is None or reader.filename is None:
        raise InvalidRequest(f"Missing required parameter: '{file_field}'.", param=file_field)
    return SpooledUpload(path=reader.path, filename=reader.filename, size=reader.size, fields=reader.fields)


async def _drain(stream) -> None:  # noqa: ANN001 - the request's async byte iterator
    """Read a bounded rest of a refused body, so the client finishes sending and reads the error."""
    drained = 0
    try:
        async for chunk in stream:
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                return
    except Exception:  # the client hung up: nothing left to drain
        return
