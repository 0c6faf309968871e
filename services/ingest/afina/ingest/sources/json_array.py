"""A JSON document holding an array of records, streamed element by element (ijson).

Row numbers are element positions (1-based): a streaming parser does not know lines.
A top-level object is accepted as a wrapper with a single array of objects
(``{"data": [...]}``) or, when small, as one record, each with a note; a large object
of anything else is a row error listing its keys (an object where an array was expected).

Records are built here from ijson's *basic* events (no path prefixes), with the nesting
depth counted on the way: ijson's prefixed events cost time in proportion to the depth
(and to the keys' length) for every event, so 100k nested ``[`` took minutes. Built this
way, reading is linear in the file's size, and a document nested deeper than
``MAX_JSON_DEPTH`` is refused at the element that does it, before anything deeper is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from afina.core.errors import DatasetInvalid
from afina.ingest.records import RowIssue, SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.jsonl import error_row, json_type, too_deep
from afina.ingest.sources.limits import MAX_JSON_DEPTH, MAX_LINE_BYTES

# array-valued keys of a single record: {"messages": [...]} is one example, not a wrapper
RECORD_ARRAY_KEYS = frozenset({"messages", "conversations", "conversation", "history", "prompt", "completion"})
_SHOWN_KEYS = 20

Events = Iterator[tuple[str, Any]]


class _TooDeep(Exception):
    """The document nests deeper than ``MAX_JSON_DEPTH``; raised where the parser stands."""


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
    """One ``SourceRow`` per array element; ``DatasetInvalid`` for a document nested past ``MAX_JSON_DEPTH``."""
    import ijson

    encoding.refuse_if_mixed(source)
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    shape = _top_level_shape(path, encoding, source)
    if isinstance(shape, SourceRow):
        yield shape
        return
    layout, wrapper_key, note = shape
    if note is not None:
        yield SourceRow(source, 0, None, note)
    number = 0
    with _open(path, encoding) as handle:
        events = ijson.basic_parse(handle, use_float=True)
        try:
            if layout == "object":  # one small object, read as one record
                event, value = next(events)
                record = build_value(event, value, events, 1)
                _check_the_end(events)
                number = 1
                yield SourceRow(source, number, record)
                return
            # past the top-level "[" (or '{"key": [' of a wrapper: its only key, checked by the shape pass)
            for _ in range(1 if layout == "array" else 3):
                next(events)
            for value in _elements(events, 1 if layout == "array" else 2):
                number += 1
                if isinstance(value, dict):
                    yield SourceRow(source, number, value)
                else:
                    yield error_row(source, number, "not_an_object",
                                    f"array element {number} is {json_type(value)}; expected a JSON object ({{...}})",
                                    field=f"[{number - 1}]")
            _check_the_end(events)
        except _TooDeep:
            raise DatasetInvalid(f"{source}: {too_deep(f'array element {number + 1}')}", rule="json_too_deep",
                                 param="file") from None
        except ijson.JSONError as exc:
            yield error_row(source, number + 1, "invalid_json",
                            f"the JSON is invalid or truncated after array element {number}: {exc}; "
                            f"the rest of the file was not read", field=f"[{number}]")
        except UnicodeDecodeError as exc:
            yield error_row(source, number + 1, "invalid_encoding",
                            f"not valid {encoding.label} after array element {number}: {exc.reason}")
        except StopIteration:  # the parser raises on a truncated document first; kept as a backstop
            yield error_row(source, number + 1, "invalid_json", f"the JSON ends after array element {number}",
                            field=f"[{number}]")
    if number == 0:
        yield error_row(source, 0, "empty_array", "the JSON array holds no records", field="file")


def build_value(event: str, value: Any, events: Events, depth: int) -> Any:
    """The value that starts with ``(event, value)``, read from ``events``; ``depth`` counts the levels it opens.

    Recursion is bounded: a level past ``MAX_JSON_DEPTH`` raises ``_TooDeep`` before it is read.
    """
    if event == "start_map":
        if depth > MAX_JSON_DEPTH:
            raise _TooDeep
        node: dict[str, Any] = {}
        for kind, key in events:  # the loop shares the event stream with the levels below it
            if kind == "end_map":
                return node
            # a map_key event: its value follows
            kind, item = next(events, _ENDED)
            node[key] = build_value(kind, item, events, depth + 1) if kind in _OPENERS else item
        return node  # the events ended early: the parser raises on its next read
    if event == "start_array":
        if depth > MAX_JSON_DEPTH:
            raise _TooDeep
        items: list[Any] = []
        for kind, item in events:
            if kind == "end_array":
                return items
            items.append(build_value(kind, item, events, depth + 1) if kind in _OPENERS else item)
        return items
    return value


_OPENERS = frozenset({"start_map", "start_array"})
_ENDED = ("end", None)


def _elements(events: Events, depth: int) -> Iterator[Any]:
    """The elements of the array just opened (at ``depth``), one at a time."""
    for event, value in events:
        if event == "end_array":
            return
        yield build_value(event, value, events, depth + 1)


def _check_the_end(events: Events) -> None:
    """Read what follows the records: the parser raises on trailing garbage (a second document, a cut one)."""
    for _ in events:
        pass


def _open(path: Path, encoding: TextEncoding) -> IO[bytes] | _Utf8Bytes:
    if encoding.is_utf8:
        return encoding.open_binary(path)
    return _Utf8Bytes(encoding.open_text(path, newline=None))


def _top_level_shape(path: Path, encoding: TextEncoding,
                     source: str) -> tuple[str, str | None, RowIssue | None] | SourceRow:
    """Where the records are: ``("array", None, None)``, ``("wrapper", key, note)`` for a one-array
    wrapper, ``("object", None, note)`` for a small single object read as one record; else an error row."""
    import ijson

    keys: list[str] = []  # the first top-level keys, for the messages
    key_count = 0
    first_is_array = wrapper = False
    depth = 1
    with _open(path, encoding) as handle:
        try:
            events = ijson.basic_parse(handle, use_float=True)
            first, _ = next(events)
            if first == "start_array":
                return "array", None, None
            if first != "start_map":
                return error_row(source, 1, "not_an_array",
                                 "expected a JSON array of records ([{...}, ...]) at the top level, got a single value",
                                 field="file")
            for event, value in events:
                if event in _OPENERS:
                    depth += 1
                    if depth > MAX_JSON_DEPTH:
                        raise _TooDeep
                    if key_count == 1 and depth == 2:
                        first_is_array = event == "start_array"
                    elif key_count == 1 and depth == 3 and first_is_array and event == "start_map":
                        wrapper = True
                elif event in ("end_map", "end_array"):
                    depth -= 1
                elif event == "map_key" and depth == 1:
                    key_count += 1
                    if len(keys) <= _SHOWN_KEYS:
                        keys.append(value)
        except _TooDeep:
            raise DatasetInvalid(f"{source}: {too_deep('the top-level object')}", rule="json_too_deep",
                                 param="file") from None
        except ijson.JSONError as exc:
            return error_row(source, 1, "invalid_json", f"not valid JSON: {exc}", field="file")
        except UnicodeDecodeError as exc:
            return error_row(source, 1, "invalid_encoding", f"not valid {encoding.label}: {exc.reason}",
                             field="file")
        except StopIteration:
            return error_row(source, 1, "invalid_json", "no JSON value in the file", field="file")
    if wrapper and key_count == 1 and keys[0] not in RECORD_ARRAY_KEYS:
        note = RowIssue(source, 0, "file", "json_wrapper_object", "warning",
                        f"the top level is an object; records were read from its only key, {keys[0]!r}")
        return "wrapper", keys[0], note
    if path.stat().st_size <= MAX_LINE_BYTES:
        note = RowIssue(source, 0, "file", "json_single_object", "warning",
                        "the top level is a single object, read as one record; a dataset is a JSON array of "
                        "records or JSON Lines (one object per line)")
        return "object", None, note
    shown = ", ".join(repr(key) for key in keys[:_SHOWN_KEYS]) + (" ..." if key_count > _SHOWN_KEYS else "")
    return error_row(source, 1, "not_an_array",
                     f"an object where an array was expected: the top level is an object with keys [{shown}], "
                     f"not an array of records. Wrap the records in [...] or upload JSON Lines (one object per "
                     f"line)", field="file")
