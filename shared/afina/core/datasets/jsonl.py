"""The first look at an upload: is it JSON Lines at all?

This is the cheap check the gateway runs while the upload streams in. The full
OpenAI-rule validation happens in the ingest stage, with per-line errors.
"""

from __future__ import annotations

import orjson

from afina.core.errors import InvalidRequest


class JsonlSniffer:
    """Fed the upload chunk by chunk; ``finish`` raises ``InvalidRequest`` if it is not JSONL."""

    MAX_LINE_BYTES = 64 * 1024 * 1024

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._pending = b""
        self.lines = 0
        self.objects = 0
        self.first_error: tuple[int, str] | None = None
        self._first_line_checked = False

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        *complete, self._pending = data.split(b"\n")
        if len(self._pending) > self.MAX_LINE_BYTES:
            raise InvalidRequest(f"{self.filename}: line {self.lines + 1} is longer than "
                                 f"{self.MAX_LINE_BYTES // (1024 * 1024)} MB", param="file")
        for line in complete:
            self._check(line)

    def _check(self, line: bytes) -> None:
        self.lines += 1
        if self.lines == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            return
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if not self._first_line_checked:
                self._reject(f"line {self.lines} is not valid JSON ({exc})")
            if self.first_error is None:
                self.first_error = (self.lines, str(exc))
            return
        if not self._first_line_checked and not isinstance(value, dict):
            self._reject(f"line {self.lines} is a JSON {type(value).__name__}, expected one object per line")
        self._first_line_checked = True
        if isinstance(value, dict):
            self.objects += 1

    def _reject(self, why: str) -> None:
        raise InvalidRequest(f"{self.filename} is not a JSONL file: {why}", param="file", code="invalid_file_format")

    def finish(self) -> None:
        if self._pending:
            self._check(self._pending)
            self._pending = b""
        if self.objects == 0:
            self._reject("it holds no JSON object")
