"""A JSON document holding an array of records, streamed element by element (ijson).

Row numbers are element positions (1-based): a streaming parser does not know lines.
A top-level object is accepted as a wrapper with a single array of objects
(``{"data": [...]}``) or, when small, as one record, each with a note; a large object
of anything else is a row error listing its keys (an object where an array was expected).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

from afina.ingest.records import RowIssue, SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.jsonl import error_row, json_type
from afina.ingest.sources.limits import MAX_LINE_BYTES

# array-valued keys of a single record: {"messages": [...]} is one example, not a wrapper
RECORD_ARRAY_KEYS = frozenset({"messages", "conversations", "conversation", "history", "prompt", "completion"})


class _Utf8Bytes:
    """ijson parses UTF-8 bytes; this feeds it a file of another encoding, re-encoded."""

    def __init__(self, text: IO[str]) -> None:
        self._text = text

    def read(self, size: int = -1) -> bytes:
        return self._text.read(size).encode("utf-8")

    def __enter__(self) -> _Utf8Bytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self._text.close()


def read_json_array(path: Path, source: str, encoding: TextEncoding) -> Iterator[SourceRow]:
    import ijson

    encoding.refuse_if_mixed(source)
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    shape = _top_level_shape(path, encoding, source)
    if isinstance(shape, SourceRow):
        yield shape
        return
    prefix, note = shape
    if note is not None:
        yield SourceRow(source, 0, None, note)
    number = 0
    with _open(path, encoding) as handle:
        try:
            for value in ijson.items(handle, prefix, use_float=True):
                number += 1
                if isinstance(value, dict):
                    yield SourceRow(source, number, value)
                else:
                    yield error_row(source, number, "not_an_object",
                                    f"array element {number} is {json_type(value)}; expected a JSON object ({{...}})",
                                    field=f"[{number - 1}]")
        except ijson.JSONError as exc:
            yield error_row(source, number + 1, "invalid_json",
                            f"the JSON is invalid or truncated after array element {number}: {exc}; "
                            f"the rest of the file was not read", field=f"[{number}]")
        except UnicodeDecodeError as exc:
            yield error_row(source, number + 1, "invalid_encoding",
                            f"not valid {encoding.label} after array element {number}: {exc.reason}")
    if number == 0:
        yield error_row(source, 0, "empty_array", "the JSON array holds no records", field="file")


def _open(path: Path, encoding: TextEncoding) -> IO[bytes] | _Utf8Bytes:
    if encoding.is_utf8:
        return encoding.open_binary(path)
    return _Utf8Bytes(encoding.open_text(path, newline=None))


def _top_level_shape(path: Path, encoding: TextEncoding, source: str) -> tuple[str, RowIssue | None] | SourceRow:
    """Where the records are: ``("item", None)`` for an array, ``("key.item", note)`` for a
    one-array wrapper, ``("", note)`` for a small single object read as one record; else an error row."""
    import ijson

    keys: list[str] = []
    wrapper_key: str | None = None
    with _open(path, encoding) as handle:
        try:
            events = ijson.parse(handle, use_float=True)
            _, first, _ = next(events)
            if first == "start_array":
                return "item", None
            if first != "start_map":
                return error_row(source, 1, "not_an_array",
                                 "expected a JSON array of records ([{...}, ...]) at the top level, got a single value",
                                 field="file")
            for prefix, event, value in events:
                if prefix == "" and event == "map_key":
                    keys.append(value)
                elif len(keys) == 1 and prefix == f"{keys[0]}.item" and event == "start_map":
                    wrapper_key = keys[0]
        except ijson.JSONError as exc:
            return error_row(source, 1, "invalid_json", f"not valid JSON: {exc}", field="file")
        except StopIteration:
            return error_row(source, 1, "invalid_json", "no JSON value in the file", field="file")
    if wrapper_key is not None and len(keys) == 1 and wrapper_key not in RECORD_ARRAY_KEYS \
            and "." not in wrapper_key:
        note = RowIssue(source, 0, "file", "json_wrapper_object", "warning",
                        f"the top level is an object; records were read from its only key, {wrapper_key!r}")
        return f"{wrapper_key}.item", note
    if path.stat().st_size <= MAX_LINE_BYTES:
        note = RowIssue(source, 0, "file", "json_single_object", "warning",
                        "the top level is a single object, read as one record; a dataset is a JSON array of "
                        "records or JSON Lines (one object per line)")
        return "", note
    shown = ", ".join(repr(key) for key in keys[:20]) + (" ..." if len(keys) > 20 else "")
    return error_row(source, 1, "not_an_array",
                     f"an object where an array was expected: the top level is an object with keys [{shown}], "
                     f"not an array of records. Wrap the records in [...] or upload JSON Lines (one object per "
                     f"line)", field="file")
