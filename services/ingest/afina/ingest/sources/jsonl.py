"""JSON Lines: one object per line, streamed; a bad line is a row error, never a failed file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from afina.core.errors import DatasetInvalid
from afina.ingest.records import RowIssue, SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.limits import MAX_JSON_DEPTH, MAX_LINE_BYTES, MiB
from afina.ingest.sources.lines import Line, iter_lines


def read_jsonl(path: Path, source: str, encoding: TextEncoding) -> Iterator[SourceRow]:
    """One ``SourceRow`` per non-blank line; line numbers are physical lines of the file."""
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    # UTF-8 (the common case) is parsed from bytes: orjson validates UTF-8 itself, per line
    handle = encoding.open_binary(path) if encoding.is_utf8 else encoding.open_text(path, newline="\n")
    with handle:
        for line in _decoded_lines(handle, source, encoding):
            if line.oversize:
                yield error_row(source, line.number, "line_too_long",
                                f"the line is {line.oversize / MiB:.1f} MiB, over the {MAX_LINE_BYTES // MiB} MiB "
                                f"per-line limit; it was not read")
                continue
            if not line.text.strip():
                continue
            yield parse_json_object(source, line.number, line.text)


def _decoded_lines(handle: IO[Any], source: str, encoding: TextEncoding) -> Iterator[Line[Any]]:
    """The file's lines; a byte the encoding the user named cannot decode refuses the file, naming the line.

    (UTF-8 is read as bytes and checked per line by the JSON parser; only another encoding decodes here.)
    """
    number = 0
    try:
        for line in iter_lines(handle):
            number = line.number
            yield line
    except UnicodeDecodeError as exc:
        raise DatasetInvalid(f"{source}: not valid {encoding.label} after line {number}: {exc.reason}",
                             line=number + 1, rule="invalid_encoding", param="file") from None


def parse_json_object(source: str, number: int, text: bytes | str) -> SourceRow:
    """A row from one JSON text that must be an object."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if isinstance(text, bytes) and not _is_utf8(text):
            return error_row(source, number, "invalid_utf8", "the line is not valid UTF-8 (the rest of the file is); "
                                                             "re-save the file as UTF-8")
        if "depth limit" in str(exc) or "recursion" in str(exc):  # orjson's own cap, 1024 levels
            return _too_deep_row(source, number)
        hint = " (the line looks truncated)" if _truncated(exc) else ""
        return error_row(source, number, "invalid_json", f"not valid JSON{hint}: {exc}")
    if not isinstance(value, dict):
        return error_row(source, number, "not_an_object",
                         f"expected a JSON object ({{...}}) per record, got {json_type(value)}")
    if _bracket_count(text) > MAX_JSON_DEPTH and nests_deeper_than(value, MAX_JSON_DEPTH):
        return _too_deep_row(source, number)
    return SourceRow(source, number, value)


def nests_deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` has more than ``limit`` levels of lists/dicts; one pass, no recursion.

    Later stages walk records recursively: a record past the cap is refused here, where it is read.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _bracket_count(text: bytes | str) -> int:
    """An upper bound of the nesting depth, counted at C speed: most records need no walk at all."""
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def too_deep(what: str) -> str:
    """The words for a value past ``MAX_JSON_DEPTH`` (JSONL lines, JSON arrays and JSON text in cells alike)."""
    return (f"{what} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; a dataset record needs a few "
            f"levels (messages, a message, its content). Flatten it")


def _too_deep_row(source: str, number: int) -> SourceRow:
    return error_row(source, number, "json_too_deep", too_deep("the record"))


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
