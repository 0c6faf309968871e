"""CSV/TSV: the header names the columns; each record is a dict of strings.

Row numbers are the physical line where the record starts (header = line 1), so a
record with a quoted multi-line field still points where an editor shows it.
The delimiter is ``options.csv_delimiter``, tab for ``.tsv``, else the one among
``, ; \\t |`` that the header line uses most (Portuguese Excel exports use ``;``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.jsonl import error_row
from afina.ingest.sources.limits import MAX_LINE_BYTES, MAX_TEXT_BYTES, MiB
from afina.ingest.sources.lines import iter_lines

CANDIDATE_DELIMITERS = (",", ";", "\t", "|")


def read_csv(path: Path, source: str, encoding: TextEncoding, delimiter: str | None = None) -> Iterator[SourceRow]:
    """One ``SourceRow`` per record after the header; blank lines are skipped."""
    encoding.refuse_if_mixed(source)
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    if delimiter is None:
        delimiter = "\t" if source.lower().endswith(".tsv") else _guess_delimiter(path, encoding)
    _allow_large_fields()
    oversize: dict[int, int] = {}  # physical line -> its length, for lines over the cap
    with encoding.open_text(path, newline="") as handle:
        physical = _capped_lines(handle, oversize)
        reader = csv.reader(physical, delimiter=delimiter, strict=True)
        header: list[str] | None = None
        consumed = 0  # physical lines read so far
        while True:
            start = consumed + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                consumed = reader.line_num
                hint = f" (a quote opened on line {start} or after is never closed)" \
                    if "unexpected end of data" in str(exc) else ""
                yield error_row(source, start, "invalid_csv", f"the record could not be parsed: {exc}{hint}")
                continue
            except UnicodeDecodeError as exc:
                raise DatasetInvalid(f"{source}: not valid {encoding.label}: {exc.reason}",
                                     line=start, rule="invalid_encoding", param="file") from None
            consumed = reader.line_num
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


def _guess_delimiter(path: Path, encoding: TextEncoding) -> str:
    with encoding.open_text(path, newline="") as handle:
        first = handle.readline(64 * 1024)
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


def _allow_large_fields() -> None:
    # the csv module caps a field at 128 KiB by default; a product description can be larger
    if csv.field_size_limit() < MAX_TEXT_BYTES:
        csv.field_size_limit(MAX_TEXT_BYTES)
