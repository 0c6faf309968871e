"""CSV/TSV: the header names the columns; each record is a dict of strings.

Row numbers are the physical line where the record starts (header = line 1), so a
record with a quoted multi-line field still points where an editor shows it.
The delimiter is ``options.csv_delimiter``, tab for ``.tsv``, else the one among
``, ; \\t |`` that the header line uses most (Portuguese Excel exports use ``;``).

A field may be as large as a JSONL record (``MAX_CSV_FIELD_CHARS``). The csv module's own
cap (128 KiB) is process-wide state; raising it would raise it for every other reader in
the worker, so this module parses with a private instance of the C csv module whose cap
is set once, to afina's limit, and reports a field past it by row and column.
"""

from __future__ import annotations

import _csv
import csv
import importlib.util
import re
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.jsonl import error_row
from afina.ingest.sources.limits import MAX_CSV_FIELD_CHARS, MAX_CSV_RECORD_CHARS, MAX_LINE_BYTES, MiB
from afina.ingest.sources.lines import iter_lines

CANDIDATE_DELIMITERS = (",", ";", "\t", "|")


def read_csv(path: Path, source: str, encoding: TextEncoding, delimiter: str | None = None) -> Iterator[SourceRow]:
    """One ``SourceRow`` per record after the header; blank lines are skipped."""
    encoding.refuse_if_mixed(source)
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    if delimiter is None:
        delimiter = "\t" if source.lower().endswith(".tsv") else _guess_delimiter(path, source, encoding)
    parser, field_limit = _csv_parser()
    oversize: dict[int, int] = {}  # physical line -> its length, for lines over the cap
    with encoding.open_text(path, newline="") as handle:
        physical = _RecordLines(_capped_lines(handle, oversize))
        reader = parser.reader(physical, delimiter=delimiter, strict=True)
        header: list[str] | None = None
        consumed = 0  # physical lines read so far
        while True:
            start = consumed + 1
            physical.lines.clear()
            try:
                record = next(reader)
            except StopIteration:
                break
            except _RecordTooLong:
                physical.skip_rest_of_record()
                consumed = physical.count
                yield error_row(source, start, "csv_record_too_long",
                                f"the record is over the {MAX_CSV_RECORD_CHARS // MiB} MiB per-record limit (it spans "
                                f"lines {start}-{consumed}: check for an unclosed quote); the record was not read")
                continue
            except parser.Error as exc:
                if "field larger than field limit" in str(exc):
                    text = physical.text()
                    physical.skip_rest_of_record()
                    consumed = physical.count
                    yield _field_too_long(source, start, consumed, text, delimiter, header, field_limit)
                    continue
                consumed = physical.count
                hint = f" (a quote opened on line {start} or after is never closed)" \
                    if "unexpected end of data" in str(exc) else ""
                yield error_row(source, start, "invalid_csv", f"the record could not be parsed: {exc}{hint}")
                continue
            except UnicodeDecodeError as exc:
                raise DatasetInvalid(f"{source}: not valid {encoding.label}: {exc.reason}",
                                     line=start, rule="invalid_encoding", param="file") from None
            consumed = physical.count
            too_long = [line for line in oversize if start <= line <= consumed]
            if too_long:
                for line in too_long:
                    del oversize[line]
                yield error_row(source, start, "line_too_long",
                                f"line {too_long[0]} is over the {MAX_LINE_BYTES // MiB} MiB per-line limit; "
                                f"the record was not read")
                continue
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if header is None:
                header = _header(record, source)
                continue
            if len(record) != len(header):
                spans = f"; it spans lines {start}-{consumed}, check for an unclosed quote" if consumed > start else ""
                yield error_row(source, start, "csv_field_count",
                                f"the record has {len(record)} field(s), the header has {len(header)}{spans}")
                continue
            yield SourceRow(source, start, dict(zip(header, record, strict=True)))
    if header is None:
        raise DatasetInvalid(f"{source} has no CSV header line", rule="empty_file", param="file")


class _RecordTooLong(Exception):
    """Raised into the csv reader by ``_RecordLines``; the reader starts afresh on its next record."""


class _RecordLines:
    """The physical lines fed to the csv reader, keeping those of the record being read (for error messages).

    The caller empties ``lines`` before each record; a record past ``MAX_CSV_RECORD_CHARS`` is cut off.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self.lines: list[str] = []
        self.count = 0  # physical lines read, the one a too-long record was cut at included
        self._chars = 0

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.count += 1
        if not self.lines:
            self._chars = 0
        self._chars += len(line)
        self.lines.append(line)
        if self._chars > MAX_CSV_RECORD_CHARS:
            raise _RecordTooLong
        return line

    def text(self) -> str:
        return "".join(self.lines)

    def skip_rest_of_record(self) -> None:
        """After a record was cut off inside a quoted field, read on to the line that closes the quote.

        Resuming the reader inside the field would read every later line of it as a broken record.
        """
        if self.text().count('"') % 2 == 0:
            return  # not inside quotes: the next line starts a record
        self.lines.clear()
        for line in self._lines:
            self.count += 1
            if line.count('"') % 2:
                return


def _field_too_long(source: str, start: int, end: int, text: str, delimiter: str, header: list[str] | None,
                    limit: int) -> SourceRow:
    index = _oversize_field(text, delimiter, limit)
    column = header[index] if header is not None and index < len(header) else f"column_{index + 1}"
    spans = f"; the field spans lines {start}-{end}, check for an unclosed quote" if end > start else ""
    return error_row(source, start, "csv_field_too_long",
                     f"the value of column {column!r} is over the {limit / MiB:g} MiB per-field limit{spans}; "
                     f"the record was not read", field=column)


def _oversize_field(text: str, delimiter: str, limit: int) -> int:
    """The 0-based index of the first field of ``text`` (a record's raw lines) longer than ``limit`` characters."""
    stops = re.compile(f"[{re.escape(delimiter)}\"]")
    index = field_start = position = 0
    quoted = False
    while position < len(text):
        if quoted:
            close = text.find('"', position)
            if close < 0 or close - field_start > limit:
                return index  # a quote that never closes runs to the end of what was read
            quoted = text.startswith('"', close + 1)  # "" is an escaped quote: still inside
            position = close + (2 if quoted else 1)
            continue
        match = stops.search(text, position)
        end = match.start() if match is not None else len(text)
        if match is None or end - field_start > limit:
            return index
        if match.group() == '"':
            quoted, position = True, end + 1
            continue
        index, field_start, position = index + 1, end + 1, end + 1
    return index


@cache
def _csv_parser() -> tuple[ModuleType, int]:
    """afina's own instance of the C csv module, its field cap set to ``MAX_CSV_FIELD_CHARS``, and that cap.

    ``_csv`` keeps its cap per module instance (multi-phase init, CPython 3.10+), so a second
    instance changes nothing for the ``csv`` module everyone else uses. Where a runtime shares
    the state between instances, the shared module is used with whatever cap it has.
    """
    spec = importlib.util.find_spec("_csv")
    if spec is not None and spec.loader is not None:
        private = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(private)
        shared_limit = csv.field_size_limit()
        private.field_size_limit(MAX_CSV_FIELD_CHARS)
        if csv.field_size_limit() == shared_limit:
            return private, MAX_CSV_FIELD_CHARS
        csv.field_size_limit(shared_limit)  # the state is shared here: put it back as it was
    return _csv, csv.field_size_limit()


def _capped_lines(handle, oversize: dict[int, int]) -> Iterator[str]:  # noqa: ANN001 - a text stream
    """Physical lines with their endings (csv needs them); an over-cap line becomes an empty line."""
    for line in iter_lines(handle):
        if line.oversize:
            oversize[line.number] = line.oversize
            yield "\n"
        else:
            yield line.text + "\n"


def _header(record: list[str], source: str) -> list[str]:
    names = [name.strip() or f"column_{index + 1}" for index, name in enumerate(record)]
    seen: set[str] = set()
    duplicates = sorted({name for name in names if name in seen or seen.add(name)})  # type: ignore[func-returns-value]
    if duplicates:
        raise DatasetInvalid(f"{source}: the CSV header repeats column name(s) {duplicates}; rename them so each "
                             f"column can be mapped", line=1, rule="csv_duplicate_columns", param="file")
    return names


def _guess_delimiter(path: Path, source: str, encoding: TextEncoding) -> str:
    with encoding.open_text(path, newline="") as handle:
        try:
            first = handle.readline(64 * 1024)
        except UnicodeDecodeError as exc:
            raise DatasetInvalid(f"{source}: not valid {encoding.label}: {exc.reason}",
                                 line=1, rule="invalid_encoding", param="file") from None
    counts = {delimiter: _count_outside_quotes(first, delimiter) for delimiter in CANDIDATE_DELIMITERS}
    best = max(CANDIDATE_DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _count_outside_quotes(line: str, delimiter: str) -> int:
    count, quoted = 0, False
    for char in line:
        if char == '"':
            quoted = not quoted
        elif char == delimiter and not quoted:
            count += 1
    return count
