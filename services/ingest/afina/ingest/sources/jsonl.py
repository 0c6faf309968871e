"""JSON Lines: one object per line, streamed; a bad line is a row error, never a failed file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from afina.ingest.records import RowIssue, SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.limits import MAX_LINE_BYTES, MiB
from afina.ingest.sources.lines import iter_lines


def read_jsonl(path: Path, source: str, encoding: TextEncoding) -> Iterator[SourceRow]:
    """One ``SourceRow`` per non-blank line; line numbers are physical lines of the file."""
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    # UTF-8 (the common case) is parsed from bytes: orjson validates UTF-8 itself, per line
    handle = encoding.open_binary(path) if encoding.is_utf8 else encoding.open_text(path, newline="\n")
    with handle:
        for line in iter_lines(handle):
            if line.oversize:
                yield error_row(source, line.number, "line_too_long",
                                f"the line is {line.oversize / MiB:.1f} MiB, over the {MAX_LINE_BYTES // MiB} MiB "
                                f"per-line limit; it was not read")
                continue
            if not line.text.strip():
                continue
            yield parse_json_object(source, line.number, line.text)


def parse_json_object(source: str, number: int, text: bytes | str) -> SourceRow:
    """A row from one JSON text that must be an object."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if isinstance(text, bytes) and not _is_utf8(text):
            return error_row(source, number, "invalid_utf8", "the line is not valid UTF-8 (the rest of the file is); "
                                                             "re-save the file as UTF-8")
        hint = " (the line looks truncated)" if _truncated(exc) else ""
        return error_row(source, number, "invalid_json", f"not valid JSON{hint}: {exc}")
    if not isinstance(value, dict):
        return error_row(source, number, "not_an_object",
                         f"expected a JSON object ({{...}}) per record, got {json_type(value)}")
    return SourceRow(source, number, value)


def error_row(source: str, number: int, rule: str, detail: str, field: str = "line") -> SourceRow:
    return SourceRow(source, number, None, RowIssue(source, number, field, rule, "error", detail))


def json_type(value: object) -> str:
    names = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
             type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _truncated(exc: orjson.JSONDecodeError) -> bool:
    return exc.pos >= len(exc.doc.rstrip()) - 1 if isinstance(exc.doc, str) else False


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
