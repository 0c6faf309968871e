"""The record formats ingest reads: one entry each, with its detector, its converter and its options section.

Each entry pairs the API's half of a format (``afina.core.datasets.formats.RecordFormatSpec``:
the ``ingest_options.format`` name and the ``IngestOptions`` section that configures it, what the
gateway validates) with what ingest does with it. ``detect_format`` and ``to_examples`` read only
this table, so adding a format is one spec in core and one entry here (a test checks the two list
the same names, in the same order).

Detection, in table order: the first entry whose ``claims`` accepts the sample decides (the paired
archive layout, a ``columns`` mapping, whole texts that look like a transcript, other whole texts);
otherwise each record votes for the first entry whose ``matches`` accepts its keys, and the
majority of the sample wins, so one odd first record does not decide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from afina.core.datasets.formats import RECORD_FORMATS_BY_NAME, RecordFormatSpec
from afina.core.datasets.options import SPLIT_ALIASES, IngestOptions, PairedOptions, TranscriptOptions
from afina.core.errors import InvalidRequest
from afina.ingest.formats.base import ConversionError, as_text
from afina.ingest.formats.chat import from_alpaca, from_openai, from_prompt_completion, from_sharegpt
from afina.ingest.formats.columns import ColumnConverter
from afina.ingest.formats.paired import pair_examples
from afina.ingest.formats.text import documents
from afina.ingest.formats.transcript import TranscriptParser
from afina.ingest.records import Example, RowIssue, SourceRow
from afina.ingest.sources.archive import PAIRED_MEMBER_KEY

Item = SourceRow | RowIssue
Converted = Example | RowIssue
# the rows (issues from the readers pass through) and the options in, examples and issues out
Converter = Callable[[Iterable[Item], IngestOptions], Iterator[Converted]]
RecordToMessages = Callable[[dict[str, Any]], list[dict[str, Any]]]
RowConverter = Callable[[SourceRow], Iterable[Converted]]


@dataclass(frozen=True)
class Sample:
    """The first readable values of a file, which detection looks at."""

    source: str
    records: list[dict[str, Any]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def mostly_text(self) -> bool:
        """Whole texts (TXT files, not records) are at least half of the sample."""
        return bool(self.texts) and len(self.texts) >= len(self.records)


@dataclass(frozen=True)
class RecordFormat:
    """A record format: ``claims`` decides for a whole sample, ``matches`` is one record's vote; ``convert``
    turns the file's rows into examples. ``spec`` holds its name and options section."""

    spec: RecordFormatSpec
    convert: Converter
    claims: Callable[[Sample, IngestOptions], bool] | None = None
    matches: Callable[[dict[str, Any]], bool] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def options_section(self) -> str | None:
        return self.spec.options_section


# converters -----------------------------------------------------------------------------------------------


def per_row(build: Callable[[IngestOptions], RowConverter]) -> Converter:
    """A converter that takes each row on its own (every format but ``paired``); issues pass through."""

    def convert(items: Iterable[Item], options: IngestOptions) -> Iterator[Converted]:
        row_converter = build(options)
        for item in items:
            if isinstance(item, RowIssue):
                yield item
            else:
                yield from row_converter(item)

    return convert


def records(to_messages: RecordToMessages, fmt: str) -> Converter:
    """A format whose records each map to one conversation (``to_messages`` raises ``ConversionError``)."""
    return per_row(lambda options: _records(to_messages, fmt, options.split.split_column))


def _records(to_messages: RecordToMessages, fmt: str, split_column: str | None) -> RowConverter:
    def run(row: SourceRow) -> tuple[Converted]:
        if not isinstance(row.value, dict):
            return (_not_a_record(row, fmt),)
        try:
            messages = to_messages(row.value)
        except ConversionError as exc:
            return (RowIssue(row.source, row.line, exc.field, exc.rule, exc.action, exc.detail),)
        return (example(row, split_column, messages=messages),)

    return run


def _columns(options: IngestOptions) -> RowConverter:
    if options.columns is None:
        raise InvalidRequest("format 'columns' needs a 'columns' mapping (user and assistant templates)",
                             param="columns")
    return _records(ColumnConverter(options.columns), "columns", options.split.split_column)


def _text(options: IngestOptions) -> RowConverter:
    split_column = options.split.split_column

    def run(row: SourceRow) -> Iterator[Converted]:
        if isinstance(row.value, str):
            yield from documents(row.value, row.source, row.line)
            return
        assert row.value is not None
        text = as_text(row.value.get("text"))
        if text is None:
            yield RowIssue(row.source, row.line, "text", "missing_field", "error", "the record has no 'text'")
            return
        yield example(row, split_column, text=text)

    return run


def _transcript(options: IngestOptions) -> RowConverter:
    parser = TranscriptParser(options.transcript or TranscriptOptions())

    def run(row: SourceRow) -> Iterator[Converted]:
        text = row.value if isinstance(row.value, str) else as_text((row.value or {}).get("text"))
        if text is None:
            yield RowIssue(row.source, row.line, "text", "missing_field", "error",
                           "a transcript record needs the chat log as text (a TXT file, or a 'text' field)")
            return
        yield from parser.parse(text, row.source, row.line)

    return run


def _paired(items: Iterable[Item], options: IngestOptions) -> Iterator[Converted]:
    return pair_examples(items, options.paired or PairedOptions())


def example(row: SourceRow, split_column: str | None, **content: Any) -> Example:
    """An example of ``row``, with the record's own split (``split_column``) when it names one."""
    made = Example(row.source, row.line, **content)
    if split_column and isinstance(row.value, dict) and row.value.get(split_column) is not None:
        raw = as_text(row.value[split_column])
        if raw and raw.strip():
            made.split = SPLIT_ALIASES.get(raw.strip().lower())
            if made.split is None:
                made.issues.append(RowIssue(row.source, row.line, split_column, "unknown_split", "warning",
                                            f"unknown split name {raw.strip()!r} (use train/treino, "
                                            f"validation/validacao, test/teste); the hash split decides"))
    return made


def _not_a_record(row: SourceRow, fmt: str) -> RowIssue:
    return RowIssue(row.source, row.line, "file", "not_a_record", "error",
                    f"whole-text content cannot be read as format {fmt!r} (it needs records with fields); "
                    f"use format 'text' or 'transcript' for text files")


# detectors ------------------------------------------------------------------------------------------------


def _has(*keys: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: all(key in record for key in keys)


def _paired_members(sample: Sample, options: IngestOptions) -> bool:
    return any(PAIRED_MEMBER_KEY in record for record in sample.records)


def _mapped_columns(sample: Sample, options: IngestOptions) -> bool:
    return options.columns is not None and bool(sample.records)


def _looks_like_transcript(sample: Sample, options: IngestOptions) -> bool:
    if not sample.mostly_text:
        return False
    if options.transcript is not None:
        return True
    parser = TranscriptParser(TranscriptOptions())
    return any(parser.looks_like_transcript(text) for text in sample.texts)


def _plain_text(sample: Sample, options: IngestOptions) -> bool:
    return sample.mostly_text


def _entry(name: str, convert: Converter, **detectors: Any) -> RecordFormat:
    return RecordFormat(RECORD_FORMATS_BY_NAME[name], convert, **detectors)


FORMATS: tuple[RecordFormat, ...] = (
    _entry("paired", _paired, claims=_paired_members),
    _entry("columns", per_row(_columns), claims=_mapped_columns),
    _entry("openai", records(from_openai, "openai"), matches=_has("messages")),
    _entry("sharegpt", records(from_sharegpt, "sharegpt"), matches=_has("conversations")),
    _entry("alpaca", records(from_alpaca, "alpaca"), matches=_has("instruction", "output")),
    _entry("prompt_completion", records(from_prompt_completion, "prompt_completion"),
           matches=_has("prompt", "completion")),
    _entry("transcript", per_row(_transcript), claims=_looks_like_transcript),
    _entry("text", per_row(_text), claims=_plain_text, matches=_has("text")),
)
FORMATS_BY_NAME: dict[str, RecordFormat] = {entry.name: entry for entry in FORMATS}


def record_format(record: dict[str, Any]) -> str | None:
    """The format one record's keys say, if any (the first entry that matches)."""
    return next((entry.name for entry in FORMATS if entry.matches is not None and entry.matches(record)), None)
